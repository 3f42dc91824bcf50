//! Where sequence numbers are assigned and where events are kept for resuming clients: the
//! one interface between the fan-out and the state a channel has beyond this node's
//! subscribers.
//!
//! The fan-out asks the [`Engine`] for the next seq of a channel, hands it the encoded frame
//! to keep, asks where a channel stands (latest seq, epoch) when a client subscribes, and
//! asks for what a resuming client missed. It tells the engine when this node starts and
//! stops watching a channel (its first local subscriber arrives, its last leaves), which is
//! when a shared engine subscribes to the channel's feed and the in-memory one starts or
//! stops counting an idle channel's time.
//!
//! - [`memory`]: everything in this process (the default): seqs, epochs, histories.
//! - [`history`]: one channel's recent frames, bounded by count, bytes and age.
//! - [`idempotency`]: publishes remembered by their `idem` key.
//! - [`redis`]: the Redis engine, shared by every node: its answers come later, as
//!   happenings read from Redis (see its module doc).
//!
//! An engine must not block or spawn threads: it runs inside the reactor's pass.

pub mod history;
pub mod idempotency;
pub mod memory;
pub mod redis;

use bytes::Bytes;

use crate::base::channel::Since;
use crate::base::time::Tick;
use crate::publish::Published;

pub use memory::MemoryEngine;

/// Totals an engine reports for `/metrics` and the stats feed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineGauges {
    /// Channels remembered, watched or dormant.
    pub known_channels: usize,
    /// Events held for resuming clients.
    pub history_events: usize,
    /// Bytes of event frames held for resuming clients.
    pub history_bytes: usize,
    /// Idempotency keys remembered.
    pub idempotency_keys: usize,
}

/// A channel's latest sequence number and the epoch it counts in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position<'a> {
    /// The last seq assigned (0: none yet).
    pub seq: u64,
    /// Changes whenever the channel's seqs restart, so a client can tell its seq is stale.
    pub epoch: &'a str,
}

/// The source of a channel's sequence numbers and history. Channel names are valid (see
/// [`crate::ws::wire::check_channel`]); calls happen on the reactor thread, inside a pass
/// (`Send` only so that a server can be moved to the thread that runs it).
pub trait Engine: Send {
    /// Takes the next sequence number of `channel`.
    fn next_seq(&mut self, channel: &str) -> u64;

    /// Whether frames are kept for resuming clients; when false and nobody listens, the
    /// fan-out skips encoding the event.
    fn keeps_history(&self) -> bool;

    /// Keeps the frame of event `seq` of `channel`, just assigned by [`next_seq`](Engine::next_seq).
    fn record(&mut self, channel: &str, seq: u64, frame: &Bytes, now: Tick);

    /// Where `channel` stands. Called for a channel this node watches.
    fn position(&mut self, channel: &str) -> Position<'_>;

    /// The frames of every event after `since`, or `None` when they cannot all be given
    /// (another epoch, or some no longer kept): the client is told it missed events.
    fn replay(&mut self, channel: &str, since: &Since, now: Tick) -> Option<Vec<Bytes>>;

    /// This node's first subscriber to `channel` arrived.
    fn watch(&mut self, channel: &str);

    /// This node's last subscriber to `channel` left at `now`.
    fn unwatch(&mut self, channel: &str, now: Tick);

    /// The result of the publish made under idempotency key `key`, if the engine still
    /// remembers it: the fan-out answers a retry with it instead of publishing again.
    fn recall(&mut self, key: &str, now: Tick) -> Option<Published>;

    /// Remembers the result of the publish just made under `key`.
    fn remember(&mut self, key: &str, published: &Published, now: Tick);

    /// Bounded periodic upkeep: expire old history, forget idle channels.
    fn sweep(&mut self, now: Tick);

    /// Current totals.
    fn gauges(&self) -> EngineGauges;
}
