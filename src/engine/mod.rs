//! Where sequence numbers are assigned, events kept for resuming clients and answers come
//! from: the one interface between the fan-out and everything a channel has beyond this
//! node's subscribers.
//!
//! The fan-out *asks* ([`Engine::publish`], [`Engine::join`], [`Engine::admit`], …) and the
//! engine *answers* with [`Happening`]s, which the fan-out takes with
//! [`Engine::happenings`] right after every call and carries out in one place: an event to
//! deliver, a join's `subscribed` and replay, a publish's result, a gap. The memory engine
//! answers within the call, so a publish is delivered and a resume replayed in the same step
//! of the loop's one thread; the Redis engine answers when Redis does, through the same
//! values, so both engines share one delivery path and one subscribe path.
//!
//! - [`memory`]: everything in this process (the default): seqs, epochs, histories.
//! - [`history`]: one channel's recent frames, bounded by count, bytes and age.
//! - [`idempotency`]: publishes remembered by their `idem` key.
//! - [`presence`]: who is on a presence channel, and the in-memory roster.
//! - [`redis`]: the Redis engine, shared by every node (see its module doc).
//!
//! Invariants: every publish part an engine takes (`Ok` from [`Engine::publish`]) is answered
//! by exactly one [`Happening::Done`]; every [`Engine::join`] by exactly one
//! [`Happening::Joined`] while the channel stays watched; an engine never blocks, spawns a
//! thread or reads a clock: `now` is passed in.

pub mod history;
pub mod idempotency;
pub mod memory;
pub mod presence;
pub mod redis;

use std::sync::Arc;

use bytes::Bytes;
use mio::{Registry, Token};

use crate::base::channel::Backfill;
use crate::base::ids::ConnId;
use crate::base::time::{Tick, TickSource};
use crate::config::{Config, EngineKind};
use crate::error::StartupError;
use crate::publish::Published;
use history::HistoryLimits;
use idempotency::IdempotencyLimits;
use presence::{Member, Members, Present};
use redis::sentinel::SentinelSettings;
use redis::tls::{Tls, TlsFiles};
use redis::{RedisEngine, RedisSettings};

pub use memory::MemoryEngine;

/// A publish in flight, by its key in the fan-out's table.
pub type OpId = usize;

/// The token an engine registers its socket `key` under, as the reactor routes it back to
/// [`Engine::on_ready`].
pub type TokenOf = fn(usize) -> Token;

/// One part of a publish: the event to one of its channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// The publish.
    pub op: OpId,
    /// Which of its channels, in the command's order.
    pub index: usize,
}

/// An event to publish on one channel.
#[derive(Clone, Copy, Debug)]
pub struct Event<'a> {
    /// A valid channel name.
    pub channel: &'a str,
    /// The event's `data`, valid JSON.
    pub data: &'a [u8],
    /// A `{"user":...}` publish: the user's connections not subscribed receive it too.
    pub to_user: bool,
    /// The publish's idempotency key, for an engine that keeps them per channel.
    pub idem: Option<&'a str>,
    /// An acknowledged publish: what every node that delivers it needs to count its pages.
    pub ack: Option<&'a AckTag>,
}

/// What travels with an acknowledged event to every node that delivers or replays it: where
/// its report is assembled, and when the wait ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckTag {
    /// The node whose worker waits for the report (its `node_id`: letters, digits, `-`, `_`).
    pub origin: Arc<str>,
    /// The report's key on that node.
    pub report: u64,
    /// When the wait ends, in Unix milliseconds (nodes' clocks are assumed to agree to within
    /// a few milliseconds, as NTP keeps them).
    pub deadline_ms: u64,
}

impl AckTag {
    /// `<deadline_ms>/<report>/<origin>`, as the Redis engine stores it beside the event.
    pub fn encode(&self) -> String {
        format!("{}/{}/{}", self.deadline_ms, self.report, self.origin)
    }

    /// The tag [`encode`](Self::encode) wrote, if `text` is one.
    pub fn decode(text: &str) -> Option<AckTag> {
        let mut parts = text.splitn(3, '/');
        let deadline_ms = parts.next()?.parse().ok()?;
        let report = parts.next()?.parse().ok()?;
        let origin = parts.next().filter(|o| !o.is_empty())?;
        Some(AckTag {
            origin: origin.into(),
            report,
            deadline_ms,
        })
    }
}

/// One event of a channel, as delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its seq.
    pub seq: u64,
    /// A `{"user":...}` publish: the user's connections receive it too.
    pub to_user: bool,
    /// The event's `data`, valid JSON.
    pub data: Bytes,
    /// It was published with `ack`.
    pub ack: Option<AckTag>,
}

/// What an engine stored for one part of a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The seq assigned (0 for a broadcast or a disconnect).
    pub seq: u64,
    /// Nodes subscribed to the channel when it was published, for an engine shared by
    /// several nodes; `None` for one that is this node alone, whose reach is the connections
    /// the fan-out queued the event to.
    pub nodes: Option<usize>,
    /// An earlier publish under the same `idem` key: `seq` and `nodes` are its.
    pub duplicate: bool,
}

/// The engine could not be asked, or did not answer: nothing is known to be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unavailable;

/// Missed events a join delivers before live ones.
#[derive(Debug, PartialEq, Eq)]
pub enum Replay {
    /// Frames already encoded (the memory engine keeps them), of consecutive seqs.
    Frames {
        /// The first frame's seq.
        first: u64,
        /// The frames.
        frames: Vec<Bytes>,
    },
    /// Events to encode (read from a stream).
    Entries(Vec<Entry>),
}

/// A join's answer: what the joining connection is told, and given, before it is live.
#[derive(Debug)]
pub struct Joined {
    /// The channel.
    pub channel: Arc<str>,
    /// The joining connection.
    pub conn: ConnId,
    /// The `seq` its `subscribed` carries: the channel's, or, when events are replayed
    /// without a recovered resume (a rewind, a newer epoch from its start), the one before
    /// the first of them.
    pub seq: u64,
    /// The epoch its `subscribed` carries.
    pub epoch: Arc<str>,
    /// With `since`: whether every event after it follows.
    pub recovered: Option<bool>,
    /// What it missed, in seq order.
    pub replay: Replay,
    /// It has seen, on another node, events up to this seq that this node has not delivered
    /// yet: it goes live with the first event past it.
    pub floor: Option<u64>,
}

/// An engine's answer, for the fan-out to carry out.
#[derive(Debug)]
pub enum Happening {
    /// The next event of `channel`, in order: to every live subscriber.
    Deliver {
        /// The channel.
        channel: Arc<str>,
        /// The event.
        entry: Entry,
        /// The publish on this node it answers, when the engine delivers within the call:
        /// the connections it reaches count as that publish's reach.
        from: Option<OpId>,
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
    /// A join's answer.
    Joined(Joined),
    /// Part `part` of a publish is done.
    Done {
        /// Which.
        part: Part,
        /// Stored, or not.
        result: Result<Stored, Unavailable>,
    },
    /// A broadcast, to every open connection.
    Broadcast {
        /// The event's data.
        data: Bytes,
        /// As for [`Happening::Deliver`].
        from: Option<OpId>,
    },
    /// Close every connection of `user`.
    Disconnect {
        /// The user.
        user: Box<str>,
        /// As for [`Happening::Deliver`]: the connections closed count.
        from: Option<OpId>,
    },
    /// The connection admitted with a pending lease may be told `connected`.
    LeaseGranted(ConnId),
    /// The user of `conn` has `max_connections_per_user` open on other nodes.
    LeaseRefused(ConnId),
    /// A message another node (or this one) sent this node with [`Engine::mail`].
    Mail(Bytes),
    /// Members joined or left presence channel `channel`, as its change `version`.
    PresenceChanged {
        /// The channel.
        channel: Arc<str>,
        /// The change's version (the last one's, for several).
        version: u64,
        /// Members that joined.
        joined: Vec<Member>,
        /// Ids of members that left.
        left: Vec<Box<str>>,
    },
    /// The answer to [`Engine::members`] asked as `ask`.
    Members {
        /// The fan-out's key for the question.
        ask: usize,
        /// The channel's presence, or why it could not be read.
        members: Result<Members, Unavailable>,
    },
    /// Presence changes of `channel` may have been missed (its shard came back): its pages
    /// need a fresh snapshot.
    PresenceStale(Arc<str>),
}

/// The state of an engine shared by several nodes, for `/health` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedState {
    /// Every shard's connection is up, the slot map is known and every watched channel is
    /// subscribed.
    pub up: bool,
    /// Shards whose connection is up.
    pub shards_up: usize,
    /// Shards known.
    pub shards: usize,
    /// Requests waiting for the shared store.
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
    /// Under Sentinel: the primary the Sentinels named last.
    pub primary: Option<String>,
    /// Under Sentinel: promotions they announced since the start.
    pub switches: u64,
}

/// Totals an engine reports for `/metrics` and the stats feed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineGauges {
    /// Channels remembered, watched or dormant.
    pub known_channels: usize,
    /// Events held for resuming clients.
    pub history_events: usize,
    /// Bytes of event frames held for resuming clients.
    pub history_bytes: usize,
    /// Idempotency keys remembered.
    pub idempotency_keys: usize,
    /// The shared store's connections, for an engine shared by several nodes.
    pub shared: Option<SharedState>,
}

/// The source of channels' sequence numbers, history and cross-node delivery. Channel names
/// are valid (see [`crate::base::channel::check_channel`]); calls happen on the reactor
/// thread, inside a pass (`Send` only so that a server can be moved to the thread that runs
/// it).
pub trait Engine: Send {
    // ---- what the fan-out asks ----

    /// Publishes `event` as `part` of a publish: answered by [`Happening::Done`] for `part`,
    /// and the event comes as a [`Happening::Deliver`] (from whichever node published it).
    ///
    /// # Errors
    /// The engine cannot take it now: nothing was stored, and nothing will answer.
    fn publish(&mut self, part: Part, event: &Event<'_>, now: Tick) -> Result<(), Unavailable>;

    /// Sends `data` to every connection, as part 0 of publish `op`.
    ///
    /// # Errors
    /// As for [`publish`](Engine::publish).
    fn broadcast(&mut self, op: OpId, data: &[u8], now: Tick) -> Result<(), Unavailable>;

    /// Closes every connection of `user`, as part 0 of publish `op`.
    ///
    /// # Errors
    /// As for [`publish`](Engine::publish).
    fn disconnect(&mut self, op: OpId, user: &str, now: Tick) -> Result<(), Unavailable>;

    /// The result of the publish made under idempotency key `key`, when this engine keeps
    /// keys per publish and still remembers it: the fan-out answers a retry with it.
    fn recall(&mut self, key: &str, now: Tick) -> Option<Published>;

    /// Remembers the result of the publish just made under `key` (see [`recall`](Engine::recall)).
    fn remember(&mut self, key: &str, published: &Published, now: Tick);

    /// Whether [`record`](Engine::record) wants the frames of `channel`: when false and nobody
    /// listens, the fan-out skips encoding the event.
    fn keeps_frames(&self, channel: &str) -> bool;

    /// Keeps the encoded frame of event `seq` of `channel`, just delivered.
    fn record(&mut self, channel: &str, seq: u64, frame: &Bytes, now: Tick);

    /// This node's first subscriber to `channel` arrived.
    fn watch(&mut self, channel: &str, now: Tick);

    /// This node's last subscriber to `channel` left.
    fn unwatch(&mut self, channel: &str, now: Tick);

    /// Where `channel` stands for `conn`, which joins it (a watched channel), and what it
    /// asks besides: what it missed since `backfill.since`, or, when there is nothing to
    /// resume or it cannot be recovered, the channel's last `backfill.rewind` events.
    /// Answered by [`Happening::Joined`].
    fn join(&mut self, channel: &str, conn: ConnId, backfill: Backfill, now: Tick);

    /// `conn`, of `user` (`first`: the user's first connection on this node), was admitted
    /// on this node's count, `max` at most per user. Returns true when the engine asks other
    /// nodes too: the connection waits for [`Happening::LeaseGranted`] or
    /// [`Happening::LeaseRefused`].
    fn admit(&mut self, user: &str, conn: ConnId, max: usize, first: bool, now: Tick) -> bool;

    /// `conn` of `user` closed (`last`: the user's last connection on this node).
    fn release(&mut self, user: &str, conn: ConnId, last: bool, now: Tick);

    /// A connection arrives on presence channel `channel` (a join when its member was not
    /// there, announced by [`Happening::PresenceChanged`]).
    fn present(&mut self, channel: &str, present: &Present<'_>, now: Tick);

    /// Connection `client` of `member` left presence channel `channel` (the member leaves
    /// `presence_linger` after its last connection, unless one came back).
    fn absent(&mut self, channel: &str, member: &str, client: &str, now: Tick);

    /// The members of `channel`: answered by [`Happening::Members`] for `ask`.
    fn members(&mut self, channel: &str, ask: usize, now: Tick);

    /// When a member's linger next ends, for an engine that times them itself.
    fn presence_due(&self) -> Option<Tick>;

    /// Members whose linger ended by `now` leave.
    fn expire_presence(&mut self, now: Tick);

    /// Sends `message` to node `to` (this node included), which gets it as a
    /// [`Happening::Mail`], unless the way there is down: mail is not stored, and whoever
    /// waits for it has a deadline. An engine that is this node alone is every node.
    fn mail(&mut self, to: &str, message: Bytes, now: Tick);

    /// Whether another publish may be started now.
    fn has_capacity(&self) -> bool;

    /// Moves the answers given since the last call to the end of `out`, in order.
    fn happenings(&mut self, out: &mut Vec<Happening>);

    // ---- the reactor's side ----

    /// Readiness on the engine's socket `key` (registered under `TokenOf(key)`).
    fn on_ready(&mut self, key: usize, now: Tick);

    /// Writes what the engine queued on its sockets; once per pass, after the fan-out.
    fn flush(&mut self, now: Tick);

    /// The engine's own upkeep, due at `now` (the first call comes at the first pass).
    /// Returns when it is next due, if ever.
    fn tick(&mut self, now: Tick) -> Option<Tick>;

    /// Bounded periodic upkeep of what is kept: expire old history, forget idle channels.
    fn sweep(&mut self, now: Tick);

    /// Current totals.
    fn gauges(&self) -> EngineGauges;
}

/// The engine `config` asks for, starting at tick 0: in memory, or over Redis (its sockets in
/// `registry`, under `token_of`). `ticks` converts the settings' durations; `node_id` names
/// this node in Redis (`node_id`, or a random name).
///
/// # Errors
/// The registry cannot be shared.
pub fn start(
    config: &Config,
    registry: &Registry,
    token_of: TokenOf,
    ticks: TickSource,
    node_id: String,
) -> Result<Box<dyn Engine>, StartupError> {
    let history = HistoryLimits {
        size: config.history_size,
        max_bytes: config.history_max_bytes,
        ttl_ticks: ticks.ticks_in(config.history_ttl),
        quiet_channels: config.max_quiet_channels,
    };
    let idempotency = IdempotencyLimits {
        limit: config.max_idempotency_keys,
        window: ticks.ticks_in(config.idempotency_window),
    };
    let memory =
        MemoryEngine::new(history, idempotency).lingering(ticks.ticks_in(config.presence_linger));
    if config.engine == EngineKind::Memory {
        return Ok(Box::new(memory));
    }
    let tls_everywhere = config.redis_tls;
    let tls = if tls_everywhere || config.redis_url.iter().any(|u| u.tls) {
        let files = TlsFiles {
            ca: config.redis_tls_ca.clone(),
            client: config
                .redis_tls_cert
                .clone()
                .zip(config.redis_tls_key.clone()),
            server_name: config.redis_tls_server_name.clone(),
        };
        Some(Tls::new(&files).map_err(StartupError::RedisTls)?)
    } else {
        None
    };
    let sentinel = (!config.redis_sentinel.is_empty()).then(|| SentinelSettings {
        addrs: config.redis_sentinel.clone(),
        master_name: config.redis_master_name.clone().unwrap_or_default(),
        password: config.redis_sentinel_password.clone(),
    });
    let settings = RedisSettings {
        urls: config.redis_url.clone(),
        sentinel,
        tls,
        tls_everywhere,
        prefix: config.redis_prefix.clone(),
        node_id,
        history_size: config.history_size,
        history_ttl: config.history_ttl,
        idempotency_window: config.idempotency_window,
        timeout: config.redis_timeout,
        lease_ttl: config.user_lease_ttl,
        presence_linger: config.presence_linger,
        check_interval: config.redis_check_interval,
        max_in_flight: config.redis_max_in_flight,
        max_in_flight_bytes: config.redis_max_in_flight_bytes,
    };
    let urls: Vec<String> = match &settings.sentinel {
        Some(sentinel) => vec![format!(
            "primary {:?} from Sentinels {}",
            sentinel.master_name,
            sentinel.addrs.join(", ")
        )],
        None => settings.urls.iter().map(ToString::to_string).collect(),
    };
    log::info!(
        "engine redis: {} as node {}{}",
        urls.join(", "),
        settings.node_id,
        if settings.tls.is_some() {
            ", over TLS"
        } else {
            ""
        }
    );
    let engine = RedisEngine::new(settings, registry, token_of, memory, ticks, Tick(0))?;
    Ok(Box::new(engine))
}
