//! The in-memory engine: each channel's seq, epoch and history live in this process. It
//! answers every request within the call (a publish is delivered, a join answered, before
//! the call returns), so replay and live delivery happen in one step of the loop's thread.
//!
//! Invariants (checked by `check_invariants` in debug builds):
//! - `by_name` and `logs` hold the same channels, under the same names;
//! - a channel this node watches (it has local subscribers) is always kept;
//! - an unwatched channel stays *dormant*, keeping its seq, epoch and history, so a client
//!   can resume. One that never had an event (*quiet*) stays for `history_ttl` too, so that a
//!   page resuming it at `seq` 0 hears "nothing missed" rather than a gap; at most
//!   `quiet_channels` are kept at once (`quiet` counts them), past that a quiet channel is
//!   freed when it stops being watched;
//! - [`MemoryEngine::sweep`] expires old history and forgets unwatched channels whose history
//!   is empty and that nobody has watched for `history_ttl`, so channels nobody watches cost
//!   nothing once that has passed. A forgotten channel that is used again starts a new epoch
//!   with `seq` 0.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use slab::Slab;

use super::history::{Delta, History, HistoryLimits};
use super::idempotency::{Idempotency, IdempotencyLimits};
use super::presence::{Present, Roster};
use super::{
    Engine, EngineGauges, Entry, Event, Happening, Joined, OpId, Part, Replay, Stored, Unavailable,
};
use crate::base::channel::{Backfill, Since};
use crate::base::ids::ConnId;
use crate::base::time::Tick;
use crate::publish::Published;

/// A channel's latest sequence number and the epoch it counts in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position<'a> {
    /// The last seq assigned (0: none yet).
    pub seq: u64,
    /// Changes whenever the channel's seqs restart, so a client can tell its seq is stale.
    pub epoch: &'a str,
}

/// Channel slots one sweep examines: a full cycle over a million channels takes about four
/// minutes at one sweep a second, at a bounded cost per round.
const SWEEP_SLOTS: usize = 4096;

struct Log {
    name: Arc<str>,
    seq: u64,
    /// Random, fixed when the channel (and so its history) begins: a resuming client whose
    /// epoch differs knows the sequence numbers it holds are from another history.
    epoch: Box<str>,
    history: History,
    /// This node has subscribers to the channel.
    watched: bool,
    /// When it was last unwatched (the creation tick, `Tick(0)`, if it never was watched).
    idle_since: Tick,
}

impl Log {
    /// Unwatched, and no event ever: only its epoch is worth keeping.
    fn is_quiet(&self) -> bool {
        !self.watched && self.seq == 0
    }
}

/// Seqs, epochs and histories of every channel, in memory.
pub struct MemoryEngine {
    by_name: HashMap<Arc<str>, usize>,
    logs: Slab<Log>,
    /// Quiet channels kept (see the module invariants).
    quiet: usize,
    limits: HistoryLimits,
    history_events: usize,
    history_bytes: usize,
    epoch_seed: RandomState,
    epochs_made: u64,
    /// The slab slot the next sweep starts at.
    sweep_cursor: usize,
    idempotency: Idempotency,
    /// Answers not yet taken by the fan-out.
    out: Vec<Happening>,
    /// Presence channels' members.
    roster: Roster,
}

/// No idempotency keys: `idem` is ignored.
const NO_IDEMPOTENCY: IdempotencyLimits = IdempotencyLimits {
    limit: 0,
    window: 0,
};

impl Default for MemoryEngine {
    fn default() -> MemoryEngine {
        MemoryEngine::new(HistoryLimits::DISABLED, NO_IDEMPOTENCY)
    }
}

impl MemoryEngine {
    /// An empty engine keeping each channel's recent events within `limits`, and `idem` keys
    /// within `idempotency`.
    pub fn new(limits: HistoryLimits, idempotency: IdempotencyLimits) -> MemoryEngine {
        MemoryEngine {
            by_name: HashMap::new(),
            logs: Slab::new(),
            quiet: 0,
            limits,
            history_events: 0,
            history_bytes: 0,
            epoch_seed: RandomState::new(),
            epochs_made: 0,
            sweep_cursor: 0,
            idempotency: Idempotency::new(idempotency),
            out: Vec::new(),
            roster: Roster::new(0),
        }
    }

    /// The same engine, whose presence members linger `ticks` after their last connection.
    pub fn lingering(self, ticks: u64) -> MemoryEngine {
        MemoryEngine {
            roster: Roster::new(ticks),
            ..self
        }
    }

    /// Expires old history and forgets channels neither watched nor holding history, examining
    /// at most `slots` slab slots from where the previous sweep stopped: a bounded amount of
    /// work however many channels there are.
    pub fn sweep_slots(&mut self, now: Tick, slots: usize) {
        let capacity = self.logs.capacity();
        for _ in 0..slots.min(capacity) {
            let key = self.sweep_cursor % capacity;
            self.sweep_cursor = key + 1;
            let Some(log) = self.logs.get_mut(key) else {
                continue;
            };
            let delta = log.history.expire(now, self.limits);
            let forgotten = !log.watched
                && log.history.is_empty()
                && now.since(log.idle_since) >= self.limits.ttl_ticks;
            let was_quiet = log.is_quiet();
            self.apply(delta);
            if forgotten {
                self.quiet -= usize::from(was_quiet);
                self.forget(key);
            }
        }
        self.check_invariants();
    }

    fn apply(&mut self, delta: Delta) {
        self.history_events = self.history_events.saturating_add_signed(delta.events);
        self.history_bytes = self.history_bytes.saturating_add_signed(delta.bytes);
    }

    fn forget(&mut self, key: usize) {
        let log = self.logs.remove(key);
        self.by_name.remove(&log.name);
    }

    /// The slab key of the channel called `name`, created if missing. Its callers are about
    /// to watch it or give it an event, so a quiet one stops counting as quiet here.
    fn entry(&mut self, name: &str) -> usize {
        if let Some(&key) = self.by_name.get(name) {
            self.quiet -= usize::from(self.logs[key].is_quiet());
            return key;
        }
        let name: Arc<str> = name.into();
        self.epochs_made += 1;
        let mut hasher = self.epoch_seed.build_hasher();
        hasher.write_u64(self.epochs_made);
        let epoch = format!("{:08x}", hasher.finish() as u32).into_boxed_str();
        let key = self.logs.insert(Log {
            name: Arc::clone(&name),
            seq: 0,
            epoch,
            history: History::default(),
            watched: false,
            idle_since: Tick(0),
        });
        self.by_name.insert(name, key);
        key
    }

    #[cfg(debug_assertions)]
    fn check_invariants(&self) {
        debug_assert_eq!(self.by_name.len(), self.logs.len());
        let quiet = self.logs.iter().filter(|(_, l)| l.is_quiet()).count();
        debug_assert_eq!(quiet, self.quiet);
    }

    #[cfg(not(debug_assertions))]
    fn check_invariants(&self) {}
}

impl MemoryEngine {
    /// Takes the next sequence number of `channel`.
    pub fn next_seq(&mut self, channel: &str) -> u64 {
        self.take_seq(channel).0
    }

    /// Takes the next sequence number of `channel`, with the channel's shared name.
    fn take_seq(&mut self, channel: &str) -> (u64, Arc<str>) {
        let key = self.entry(channel);
        let log = &mut self.logs[key];
        log.seq += 1;
        (log.seq, Arc::clone(&log.name))
    }

    /// Keeps the frame of event `seq` of `channel`, just assigned by [`next_seq`](Self::next_seq).
    pub fn record(&mut self, channel: &str, seq: u64, frame: &Bytes, now: Tick) {
        let Some(&key) = self.by_name.get(channel) else {
            debug_assert!(false, "record before next_seq");
            return;
        };
        let delta = self.logs[key].history.record(seq, frame, now, self.limits);
        self.apply(delta);
    }

    /// Where `channel` stands (remembering it from now on).
    pub fn position(&mut self, channel: &str) -> Position<'_> {
        let key = match self.by_name.get(channel) {
            Some(&key) => key,
            None => self.entry(channel),
        };
        let log = &self.logs[key];
        Position {
            seq: log.seq,
            epoch: &log.epoch,
        }
    }

    /// The frames of every event after `since`, or `None` when they cannot all be given
    /// (another epoch, or some no longer kept): the client is told it missed events.
    pub fn replay(&mut self, channel: &str, since: &Since, now: Tick) -> Option<Vec<Bytes>> {
        let &key = self.by_name.get(channel)?;
        let log = &mut self.logs[key];
        let delta = log.history.expire(now, self.limits);
        let missed = (*log.epoch == *since.epoch)
            .then(|| {
                log.history
                    .after(since.seq, log.seq)
                    .map(|frames| frames.cloned().collect())
            })
            .flatten();
        self.apply(delta);
        missed
    }

    /// The frames of the newest `n` events of `channel` still held, oldest first: they end
    /// at its latest seq, since every event is kept while there is history at all.
    fn latest(&mut self, channel: &str, n: usize, now: Tick) -> Vec<Bytes> {
        let Some(&key) = self.by_name.get(channel).filter(|_| n > 0) else {
            return Vec::new();
        };
        let log = &mut self.logs[key];
        let delta = log.history.expire(now, self.limits);
        let frames = log.history.last(n).cloned().collect();
        self.apply(delta);
        frames
    }

    /// This node's first subscriber to `channel` arrived.
    pub fn watch(&mut self, channel: &str) {
        let key = self.entry(channel);
        self.logs[key].watched = true;
        self.check_invariants();
    }

    /// This node's last subscriber to `channel` left at `now`.
    pub fn unwatch(&mut self, channel: &str, now: Tick) {
        let Some(&key) = self.by_name.get(channel) else {
            debug_assert!(false, "unwatch of an unknown channel");
            return;
        };
        let log = &mut self.logs[key];
        log.watched = false;
        log.idle_since = now;
        if log.is_quiet() {
            if self.quiet < self.limits.quiet_channels {
                self.quiet += 1;
            } else {
                self.forget(key);
            }
        }
        self.check_invariants();
    }

    /// A part of publish `op` done now.
    fn done(&mut self, part: Part, seq: u64) {
        let stored = Stored {
            seq,
            nodes: None,
            duplicate: false,
        };
        self.out.push(Happening::Done {
            part,
            result: Ok(stored),
        });
    }
}

impl Engine for MemoryEngine {
    fn publish(&mut self, part: Part, event: &Event<'_>, _now: Tick) -> Result<(), Unavailable> {
        let (seq, name) = self.take_seq(event.channel);
        let entry = Entry {
            seq,
            to_user: event.to_user,
            data: Bytes::copy_from_slice(event.data),
            ack: event.ack.cloned(),
        };
        self.out.push(Happening::Deliver {
            channel: name,
            entry,
            from: Some(part.op),
        });
        self.done(part, seq);
        Ok(())
    }

    fn broadcast(&mut self, op: OpId, data: &[u8], _now: Tick) -> Result<(), Unavailable> {
        self.out.push(Happening::Broadcast {
            data: Bytes::copy_from_slice(data),
            from: Some(op),
        });
        self.done(Part { op, index: 0 }, 0);
        Ok(())
    }

    fn disconnect(&mut self, op: OpId, user: &str, _now: Tick) -> Result<(), Unavailable> {
        self.out.push(Happening::Disconnect {
            user: user.into(),
            from: Some(op),
        });
        self.done(Part { op, index: 0 }, 0);
        Ok(())
    }

    fn recall(&mut self, key: &str, now: Tick) -> Option<Published> {
        self.idempotency.recall(key, now)
    }

    fn remember(&mut self, key: &str, published: &Published, now: Tick) {
        self.idempotency.remember(key, published, now);
    }

    fn keeps_frames(&self, _channel: &str) -> bool {
        self.limits.size > 0
    }

    fn record(&mut self, channel: &str, seq: u64, frame: &Bytes, now: Tick) {
        MemoryEngine::record(self, channel, seq, frame, now);
    }

    fn watch(&mut self, channel: &str, _now: Tick) {
        MemoryEngine::watch(self, channel);
    }

    fn unwatch(&mut self, channel: &str, now: Tick) {
        MemoryEngine::unwatch(self, channel, now);
    }

    fn join(&mut self, channel: &str, conn: ConnId, backfill: Backfill, now: Tick) {
        // Replayed within this call: on one thread no publish can land between the replay
        // and live delivery, so there is no gap and no duplicate.
        let missed = backfill
            .since
            .map(|since| self.replay(channel, &since, now));
        let recovered = missed.as_ref().map(Option::is_some);
        let (frames, rewound) = match missed.flatten() {
            Some(frames) => (frames, 0),
            None => {
                let frames = self.latest(channel, backfill.rewind, now);
                let rewound = frames.len() as u64;
                (frames, rewound)
            }
        };
        let position = self.position(channel);
        // What is replayed always ends with the channel's latest event.
        let first = position.seq + 1 - frames.len() as u64;
        let joined = Joined {
            channel: channel.into(),
            conn,
            seq: position.seq - rewound,
            epoch: position.epoch.into(),
            recovered,
            replay: Replay::Frames { first, frames },
            floor: None,
        };
        self.out.push(Happening::Joined(joined));
    }

    fn admit(&mut self, _user: &str, _conn: ConnId, _max: usize, _first: bool, _now: Tick) -> bool {
        false // this node's count is the whole count
    }

    fn release(&mut self, _user: &str, _conn: ConnId, _last: bool, _now: Tick) {}

    fn present(&mut self, channel: &str, present: &Present<'_>, _now: Tick) {
        self.roster.present(channel, present, &mut self.out);
    }

    fn absent(&mut self, channel: &str, member: &str, client: &str, now: Tick) {
        self.roster
            .absent(channel, member, client, now, &mut self.out);
    }

    fn members(&mut self, channel: &str, ask: usize, _now: Tick) {
        let members = Ok(self.roster.members(channel));
        self.out.push(Happening::Members { ask, members });
    }

    fn presence_due(&self) -> Option<Tick> {
        self.roster.next_due()
    }

    fn expire_presence(&mut self, now: Tick) {
        self.roster.expire(now, &mut self.out);
    }

    /// This node is every node.
    fn mail(&mut self, _to: &str, message: Bytes, _now: Tick) {
        self.out.push(Happening::Mail(message));
    }

    fn has_capacity(&self) -> bool {
        true
    }

    fn happenings(&mut self, out: &mut Vec<Happening>) {
        out.append(&mut self.out);
    }

    fn on_ready(&mut self, _key: usize, _now: Tick) {}

    fn flush(&mut self, _now: Tick) {}

    fn tick(&mut self, _now: Tick) -> Option<Tick> {
        None
    }

    fn sweep(&mut self, now: Tick) {
        self.sweep_slots(now, SWEEP_SLOTS);
    }

    fn gauges(&self) -> EngineGauges {
        EngineGauges {
            known_channels: self.logs.len(),
            history_events: self.history_events,
            history_bytes: self.history_bytes,
            idempotency_keys: self.idempotency.len(),
            shared: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HistoryLimits = HistoryLimits {
        size: 10,
        max_bytes: 1 << 20,
        ttl_ticks: 100,
        quiet_channels: 0,
    };

    fn since(seq: u64, epoch: &str) -> Since {
        Since {
            seq,
            epoch: epoch.to_string(),
        }
    }

    fn epoch(engine: &mut MemoryEngine, channel: &str) -> String {
        engine.position(channel).epoch.to_string()
    }

    #[test]
    fn seqs_count_per_channel_and_survive_while_watched_or_dormant() {
        let mut engine = MemoryEngine::default();
        assert_eq!(engine.next_seq("nobody"), 1);
        assert_eq!(engine.next_seq("nobody"), 2);
        engine.watch("a");
        assert_eq!(engine.position("a").seq, 0);
        assert_eq!(engine.next_seq("a"), 1);
        engine.unwatch("a", Tick(0));
        engine.watch("a");
        assert_eq!(
            engine.position("a").seq,
            1,
            "a dormant channel kept its seq"
        );
        assert_eq!(engine.next_seq("a"), 2);
        engine.unwatch("a", Tick(0));
        engine.watch("b");
        engine.unwatch("b", Tick(0));
        assert!(
            !engine.by_name.contains_key("b"),
            "never published and no quiet channels allowed: freed entirely"
        );
    }

    #[test]
    fn sweeps_forget_channels_nobody_watches_once_their_history_expires() {
        let mut engine = MemoryEngine::new(LIMITS, NO_IDEMPOTENCY);
        let frame = Bytes::from_static(b"event");
        let seq = engine.next_seq("dormant");
        engine.record("dormant", seq, &frame, Tick(0));
        engine.watch("watched");
        let seq = engine.next_seq("watched");
        engine.record("watched", seq, &frame, Tick(0));
        engine.sweep_slots(Tick(50), 1000);
        assert_eq!(engine.logs.len(), 2, "history still young");
        assert_eq!(engine.next_seq("dormant"), 2);
        engine.sweep_slots(Tick(500), 1000);
        assert_eq!(engine.logs.len(), 1, "the watched channel stays");
        assert_eq!(engine.gauges().history_events, 0);
        assert_eq!(engine.gauges().history_bytes, 0);
        assert_eq!(
            engine.next_seq("dormant"),
            1,
            "forgotten: a new epoch from 0"
        );
        assert_eq!(engine.next_seq("watched"), 2);
    }

    #[test]
    fn a_quiet_channel_keeps_its_epoch_for_the_ttl_within_the_quiet_limit() {
        let mut engine = MemoryEngine::new(
            HistoryLimits {
                quiet_channels: 2,
                ..LIMITS
            },
            NO_IDEMPOTENCY,
        );
        engine.watch("a");
        let first = epoch(&mut engine, "a");
        engine.unwatch("a", Tick(10));
        engine.watch("a");
        assert_eq!(engine.position("a").seq, 0);
        assert_eq!(epoch(&mut engine, "a"), first, "the same epoch");
        assert_eq!(
            engine
                .replay("a", &since(0, &first), Tick(20))
                .map(|f| f.len()),
            Some(0),
            "nothing was missed"
        );
        engine.unwatch("a", Tick(20));
        // An event while nobody watches lands in the same epoch, so a resume replays it.
        let seq = engine.next_seq("a");
        engine.record("a", seq, &Bytes::from_static(b"e1"), Tick(30));
        engine.watch("a");
        assert_eq!(
            engine
                .replay("a", &since(0, &first), Tick(40))
                .map(|f| f.len()),
            Some(1)
        );
        assert_eq!(engine.replay("a", &since(0, "other"), Tick(40)), None);
        engine.unwatch("a", Tick(40));

        for channel in ["b", "c", "d"] {
            engine.watch(channel);
            engine.unwatch(channel, Tick(50));
        }
        assert_eq!(
            engine.quiet, 2,
            "b and c are kept, d is over the limit and freed"
        );
        assert!(engine.by_name.contains_key("c") && !engine.by_name.contains_key("d"));
        engine.sweep_slots(Tick(149), 1000);
        assert!(
            engine.by_name.contains_key("b"),
            "not yet history_ttl since it was left"
        );
        engine.sweep_slots(Tick(150), 1000);
        assert_eq!(engine.quiet, 0);
        assert!(
            engine.logs.is_empty(),
            "every channel forgotten after the TTL"
        );
    }

    #[test]
    fn a_sweep_examines_a_bounded_number_of_slots_and_wraps() {
        let mut engine = MemoryEngine::default();
        for i in 0..10 {
            engine.next_seq(&format!("c{i}"));
        }
        engine.sweep_slots(Tick(0), 4);
        assert_eq!(engine.logs.len(), 6);
        let all = engine.logs.capacity();
        engine.sweep_slots(Tick(0), all);
        assert_eq!(engine.logs.len(), 0);
        engine.next_seq("again");
        engine.sweep_slots(Tick(0), all);
        assert_eq!(engine.logs.len(), 0, "the cursor wrapped around");
    }
}
