//! The channel registry: channel name → subscribers, and each channel's sequence number.
//! It decides who receives an event; the reactor queues the bytes. It never writes to sockets.
//!
//! Invariants (checked by `check_invariants` in debug builds):
//! - `by_name` and `channels` hold the same channels, under the same names;
//! - a channel with subscribers is *active*; `active` counts them;
//! - a channel that loses its last subscriber stays *dormant*, keeping its name, `seq`, epoch
//!   and history, so a client can resume. One that never had an event (*quiet*) stays for
//!   `history_ttl` too, so that a page resuming it at `seq` 0 hears "nothing missed" rather
//!   than a gap; at most `quiet_channels` are kept at once (`quiet` counts them), past that
//!   a quiet channel is freed when its last subscriber leaves;
//! - [`Hub::sweep`] expires old history and forgets dormant channels whose history is empty
//!   and that nobody has watched for `history_ttl`, so channels nobody watches cost nothing
//!   once that has passed. A forgotten channel that is used again starts a new epoch with
//!   `seq` 0.

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexSet;
use indexmap::set::Slice;
use slab::Slab;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use bytes::Bytes;

use crate::client::ConnId;
use crate::history::{Delta, History, HistoryLimits};
use crate::timer::Tick;
use crate::wire::ChannelName;

/// Index of a channel in the hub, valid while the channel has subscribers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelId(u32);

struct Channel {
    name: Arc<str>,
    seq: u64,
    /// Random, fixed when the channel (and so its history) begins: a resuming client whose
    /// epoch differs knows the sequence numbers it holds are from another history.
    epoch: Box<str>,
    history: History,
    /// Insertion-ordered for cache-friendly iteration; O(1) removal by `swap_remove`.
    subscribers: IndexSet<ConnId>,
    /// When the last subscriber left (the creation tick, `Tick(0)`, if none ever came).
    idle_since: Tick,
}

impl Channel {
    /// No subscriber and no event ever: only its epoch is worth keeping.
    fn is_quiet(&self) -> bool {
        self.subscribers.is_empty() && self.seq == 0
    }
}

/// The registry of channels.
pub struct Hub {
    by_name: HashMap<Arc<str>, usize>,
    channels: Slab<Channel>,
    active: usize,
    /// Quiet channels kept (see the module invariants).
    quiet: usize,
    limits: HistoryLimits,
    history_events: usize,
    history_bytes: usize,
    epoch_seed: RandomState,
    epochs_made: u64,
    /// The slab slot the next sweep starts at.
    sweep_cursor: usize,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub::with_history(HistoryLimits::DISABLED)
    }
}

impl Hub {
    /// An empty hub without history.
    pub fn new() -> Hub {
        Hub::default()
    }

    /// An empty hub keeping each channel's recent events within `limits`.
    pub fn with_history(limits: HistoryLimits) -> Hub {
        Hub {
            by_name: HashMap::new(),
            channels: Slab::new(),
            active: 0,
            quiet: 0,
            limits,
            history_events: 0,
            history_bytes: 0,
            epoch_seed: RandomState::new(),
            epochs_made: 0,
            sweep_cursor: 0,
        }
    }

    /// True when events are kept for resuming clients.
    pub fn keeps_history(&self) -> bool {
        self.limits.size > 0
    }

    /// Events and bytes held in all histories.
    pub fn history_totals(&self) -> (usize, usize) {
        (self.history_events, self.history_bytes)
    }

    /// The channel's epoch.
    pub fn epoch(&self, id: ChannelId) -> &str {
        &self.channels[id.0 as usize].epoch
    }

    /// Keeps the frame of event `seq` in the channel's history.
    pub fn record(&mut self, id: ChannelId, seq: u64, frame: &Bytes, now: Tick) {
        let delta = self.channels[id.0 as usize]
            .history
            .record(seq, frame, now, self.limits);
        self.apply(delta);
    }

    /// The frames a client that last saw `since_seq` in `since_epoch` missed, or `None` when
    /// the gap cannot be filled (another epoch, or events no longer in the history).
    pub fn resume(
        &mut self,
        id: ChannelId,
        since_seq: u64,
        since_epoch: &str,
        now: Tick,
    ) -> Option<Vec<Bytes>> {
        let channel = &mut self.channels[id.0 as usize];
        let delta = channel.history.expire(now, self.limits);
        let missed = (*channel.epoch == *since_epoch)
            .then(|| {
                channel
                    .history
                    .after(since_seq, channel.seq)
                    .map(|frames| frames.cloned().collect())
            })
            .flatten();
        self.apply(delta);
        missed
    }

    fn apply(&mut self, delta: Delta) {
        self.history_events = self.history_events.saturating_add_signed(delta.events);
        self.history_bytes = self.history_bytes.saturating_add_signed(delta.bytes);
    }

    /// Expires old history and forgets channels with neither subscribers nor history,
    /// examining at most `slots` slab slots, from where the previous sweep stopped: a bounded
    /// amount of work however many channels there are.
    pub fn sweep(&mut self, now: Tick, slots: usize) {
        let capacity = self.channels.capacity();
        for _ in 0..slots.min(capacity) {
            let key = self.sweep_cursor % capacity;
            self.sweep_cursor = key + 1;
            let Some(channel) = self.channels.get_mut(key) else {
                continue;
            };
            let delta = channel.history.expire(now, self.limits);
            let forgotten = channel.subscribers.is_empty()
                && channel.history.is_empty()
                && now.since(channel.idle_since) >= self.limits.ttl_ticks;
            let was_quiet = channel.is_quiet();
            self.apply(delta);
            if forgotten {
                self.quiet -= usize::from(was_quiet);
                let channel = self.channels.remove(key);
                self.by_name.remove(&channel.name);
            }
        }
        self.check_invariants();
    }

    /// Channels with at least one subscriber.
    pub fn active_channels(&self) -> usize {
        self.active
    }

    /// Channels remembered, with subscribers or dormant.
    pub fn known_channels(&self) -> usize {
        self.channels.len()
    }

    /// Adds `conn` to `name`'s subscribers (a no-op if it already is one). Returns the channel
    /// and its latest sequence number.
    pub fn subscribe(&mut self, name: &ChannelName, conn: ConnId) -> (ChannelId, u64) {
        let key = self.entry(name.as_str());
        let channel = &mut self.channels[key];
        if channel.subscribers.is_empty() {
            self.active += 1;
        }
        channel.subscribers.insert(conn);
        let seq = channel.seq;
        self.check_invariants();
        (ChannelId(key as u32), seq)
    }

    /// Removes `conn` from the channel's subscribers. When it was the last, the channel
    /// becomes dormant at `now`; a quiet one is freed instead once `quiet_channels` are kept.
    pub fn unsubscribe(&mut self, id: ChannelId, conn: ConnId, now: Tick) {
        let key = id.0 as usize;
        let Some(channel) = self.channels.get_mut(key) else {
            debug_assert!(false, "unsubscribe from a freed channel");
            return;
        };
        if !channel.subscribers.swap_remove(&conn) || !channel.subscribers.is_empty() {
            return;
        }
        self.active -= 1;
        channel.subscribers = IndexSet::new(); // release the set's memory
        channel.idle_since = now;
        if channel.is_quiet() {
            if self.quiet < self.limits.quiet_channels {
                self.quiet += 1;
            } else {
                let channel = self.channels.remove(key);
                self.by_name.remove(&channel.name);
            }
        }
        self.check_invariants();
    }

    /// The channel called `name`, if it has subscribers.
    pub fn find(&self, name: &str) -> Option<ChannelId> {
        let key = *self.by_name.get(name)?;
        (!self.channels[key].subscribers.is_empty()).then_some(ChannelId(key as u32))
    }

    /// Takes the next sequence number of `name` and returns it with the subscribers to
    /// deliver to. The name must be valid (see [`crate::wire::check_channel`]).
    pub fn publish(&mut self, name: &str) -> (ChannelId, u64, &Slice<ConnId>) {
        let key = self.entry(name);
        let channel = &mut self.channels[key];
        channel.seq += 1;
        (
            ChannelId(key as u32),
            channel.seq,
            channel.subscribers.as_slice(),
        )
    }

    /// The slab key of the channel called `name`, created if missing. Its callers are about
    /// to give it a subscriber or an event, so a quiet one stops counting as quiet here.
    fn entry(&mut self, name: &str) -> usize {
        if let Some(&key) = self.by_name.get(name) {
            self.quiet -= usize::from(self.channels[key].is_quiet());
            return key;
        }
        let name: Arc<str> = name.into();
        self.epochs_made += 1;
        let mut hasher = self.epoch_seed.build_hasher();
        hasher.write_u64(self.epochs_made);
        let epoch = format!("{:08x}", hasher.finish() as u32).into_boxed_str();
        let key = self.channels.insert(Channel {
            name: Arc::clone(&name),
            seq: 0,
            epoch,
            history: History::default(),
            subscribers: IndexSet::new(),
            idle_since: Tick(0),
        });
        assert!(key <= u32::MAX as usize, "more than 2^32 channels");
        self.by_name.insert(name, key);
        key
    }

    #[cfg(debug_assertions)]
    fn check_invariants(&self) {
        debug_assert_eq!(self.by_name.len(), self.channels.len());
        let active = self
            .channels
            .iter()
            .filter(|(_, c)| !c.subscribers.is_empty())
            .count();
        debug_assert_eq!(active, self.active);
        let quiet = self.channels.iter().filter(|(_, c)| c.is_quiet()).count();
        debug_assert_eq!(quiet, self.quiet);
    }

    #[cfg(not(debug_assertions))]
    fn check_invariants(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(key: u32) -> ConnId {
        ConnId { key, generation: 1 }
    }

    fn ids(subscribers: &Slice<ConnId>) -> Vec<ConnId> {
        subscribers.iter().copied().collect()
    }

    fn name(s: &str) -> ChannelName {
        ChannelName::parse(s).unwrap()
    }

    #[test]
    fn subscribe_is_idempotent_and_publish_reaches_subscribers() {
        let mut hub = Hub::new();
        let (a, seq) = hub.subscribe(&name("a"), conn(1));
        assert_eq!(seq, 0);
        assert_eq!(hub.subscribe(&name("a"), conn(1)), (a, 0));
        hub.subscribe(&name("a"), conn(2));
        hub.subscribe(&name("b"), conn(3));
        let (_, seq, subscribers) = hub.publish("a");
        assert_eq!((seq, ids(subscribers)), (1, vec![conn(1), conn(2)]));
        assert_eq!(hub.publish("a").1, 2);
        assert_eq!(ids(hub.publish("b").2), vec![conn(3)]);
        assert_eq!(hub.active_channels(), 2);
    }

    #[test]
    fn empty_channels_are_freed_and_seq_is_never_reused() {
        let mut hub = Hub::new();
        let (a, _) = hub.subscribe(&name("a"), conn(1));
        hub.unsubscribe(a, conn(1), Tick(0));
        assert_eq!(hub.active_channels(), 0);
        assert!(hub.by_name.is_empty(), "never published: freed entirely");

        let (a, _) = hub.subscribe(&name("a"), conn(1));
        hub.publish("a");
        hub.unsubscribe(a, conn(1), Tick(0));
        assert_eq!(hub.find("a"), None);
        assert_eq!(
            hub.subscribe(&name("a"), conn(2)).1,
            1,
            "dormant channel kept its seq"
        );
        assert_eq!(hub.publish("a").1, 2);
    }

    #[test]
    fn sweeps_forget_channels_nobody_watches_once_their_history_expires() {
        let limits = HistoryLimits {
            size: 10,
            max_bytes: 1 << 20,
            ttl_ticks: 100,
            quiet_channels: 0,
        };
        let mut hub = Hub::with_history(limits);
        let frame = Bytes::from_static(b"event");
        let (id, _, _) = hub.publish("dormant");
        hub.record(id, 1, &frame, Tick(0));
        let (watched, _) = hub.subscribe(&name("watched"), conn(1));
        hub.publish("watched");
        hub.record(watched, 1, &frame, Tick(0));
        hub.sweep(Tick(50), 1000);
        assert_eq!(hub.channels.len(), 2, "history still young");
        assert_eq!(hub.publish("dormant").1, 2);
        hub.sweep(Tick(500), 1000);
        assert_eq!(hub.channels.len(), 1, "the subscribed channel stays");
        assert_eq!(hub.history_totals(), (0, 0));
        assert_eq!(hub.publish("dormant").1, 1, "forgotten: a new epoch from 0");
        assert_eq!(hub.publish("watched").1, 2);
    }

    #[test]
    fn a_quiet_channel_keeps_its_epoch_for_the_ttl_within_the_quiet_limit() {
        let limits = HistoryLimits {
            size: 10,
            max_bytes: 1 << 20,
            ttl_ticks: 100,
            quiet_channels: 2,
        };
        let mut hub = Hub::with_history(limits);
        let (a, _) = hub.subscribe(&name("a"), conn(1));
        let epoch = hub.epoch(a).to_string();
        hub.unsubscribe(a, conn(1), Tick(10));
        let (a, seq) = hub.subscribe(&name("a"), conn(2));
        assert_eq!((seq, hub.epoch(a)), (0, epoch.as_str()), "the same epoch");
        assert_eq!(
            hub.resume(a, 0, &epoch, Tick(20)).map(|f| f.len()),
            Some(0),
            "nothing was missed"
        );
        hub.unsubscribe(a, conn(2), Tick(20));
        // An event while nobody watches lands in the same epoch, so a resume replays it.
        let (id, seq, _) = hub.publish("a");
        hub.record(id, seq, &Bytes::from_static(b"e1"), Tick(30));
        let (a, _) = hub.subscribe(&name("a"), conn(3));
        assert_eq!(hub.resume(a, 0, &epoch, Tick(40)).map(|f| f.len()), Some(1));
        hub.unsubscribe(a, conn(3), Tick(40));

        for (n, channel) in ["b", "c", "d"].into_iter().enumerate() {
            let (id, _) = hub.subscribe(&name(channel), conn(10 + n as u32));
            hub.unsubscribe(id, conn(10 + n as u32), Tick(50));
        }
        assert_eq!(
            hub.quiet, 2,
            "b and c are kept, d is over the limit and freed"
        );
        assert!(hub.by_name.contains_key("c") && !hub.by_name.contains_key("d"));
        hub.sweep(Tick(149), 1000);
        assert!(
            hub.by_name.contains_key("b"),
            "not yet history_ttl since it was left"
        );
        hub.sweep(Tick(150), 1000);
        assert_eq!(hub.quiet, 0);
        assert!(
            hub.channels.is_empty(),
            "every channel forgotten after the TTL"
        );
    }

    #[test]
    fn a_sweep_examines_a_bounded_number_of_slots_and_wraps() {
        let mut hub = Hub::new();
        for i in 0..10 {
            hub.publish(&format!("c{i}"));
        }
        hub.sweep(Tick(0), 4);
        assert_eq!(hub.channels.len(), 6);
        let all = hub.channels.capacity();
        hub.sweep(Tick(0), all);
        assert_eq!(hub.channels.len(), 0);
        hub.publish("again");
        hub.sweep(Tick(0), all);
        assert_eq!(hub.channels.len(), 0, "the cursor wrapped around");
    }

    #[test]
    fn publish_without_subscribers_counts_seq() {
        let mut hub = Hub::new();
        let (_, seq, subscribers) = hub.publish("nobody");
        assert_eq!((seq, subscribers.len()), (1, 0));
        assert_eq!(hub.publish("nobody").1, 2);
        assert_eq!(hub.active_channels(), 0);
    }

    #[test]
    fn churn_leaves_nothing_behind() {
        let mut hub = Hub::new();
        for round in 0..1000u32 {
            let ids: Vec<_> = (0..10)
                .map(|i| hub.subscribe(&name(&format!("c{}", i % 3)), conn(round * 10 + i)))
                .collect();
            for (i, (id, _)) in ids.into_iter().enumerate() {
                hub.unsubscribe(id, conn(round * 10 + i as u32), Tick(0));
            }
        }
        assert_eq!(hub.active_channels(), 0);
        assert!(hub.channels.is_empty());
    }
}
