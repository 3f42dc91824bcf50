//! The channel registry: channel name → subscribers, and each channel's sequence number.
//! It decides who receives an event; the reactor queues the bytes. It never writes to sockets.
//!
//! Invariants (checked by `check_invariants` in debug builds):
//! - `by_name` and `channels` hold the same channels, under the same names;
//! - a channel with subscribers is *active*; `active` counts them;
//! - a channel that loses its last subscriber is freed, unless it was ever published to: then
//!   it stays *dormant*, keeping only its name and `seq`, because a sequence number is never
//!   reused while the server runs. Dormant channels cost about 100 bytes each.

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexSet;
use indexmap::set::Slice;
use slab::Slab;

use crate::client::ConnId;
use crate::wire::ChannelName;

/// Index of a channel in the hub, valid while the channel has subscribers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelId(u32);

struct Channel {
    name: Arc<str>,
    seq: u64,
    /// Insertion-ordered for cache-friendly iteration; O(1) removal by `swap_remove`.
    subscribers: IndexSet<ConnId>,
}

/// The registry of channels.
#[derive(Default)]
pub struct Hub {
    by_name: HashMap<Arc<str>, usize>,
    channels: Slab<Channel>,
    active: usize,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Hub {
        Hub::default()
    }

    /// Channels with at least one subscriber.
    pub fn active_channels(&self) -> usize {
        self.active
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

    /// Removes `conn` from the channel's subscribers, freeing the channel when it was the last
    /// and nothing was ever published to it.
    pub fn unsubscribe(&mut self, id: ChannelId, conn: ConnId) {
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
        if channel.seq == 0 {
            let channel = self.channels.remove(key);
            self.by_name.remove(&channel.name);
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
    pub fn publish(&mut self, name: &str) -> (u64, &Slice<ConnId>) {
        let key = self.entry(name);
        let channel = &mut self.channels[key];
        channel.seq += 1;
        (channel.seq, channel.subscribers.as_slice())
    }

    fn entry(&mut self, name: &str) -> usize {
        if let Some(&key) = self.by_name.get(name) {
            return key;
        }
        let name: Arc<str> = name.into();
        let key = self.channels.insert(Channel {
            name: Arc::clone(&name),
            seq: 0,
            subscribers: IndexSet::new(),
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
        let (seq, subscribers) = hub.publish("a");
        assert_eq!((seq, ids(subscribers)), (1, vec![conn(1), conn(2)]));
        assert_eq!(hub.publish("a").0, 2);
        assert_eq!(ids(hub.publish("b").1), vec![conn(3)]);
        assert_eq!(hub.active_channels(), 2);
    }

    #[test]
    fn empty_channels_are_freed_and_seq_is_never_reused() {
        let mut hub = Hub::new();
        let (a, _) = hub.subscribe(&name("a"), conn(1));
        hub.unsubscribe(a, conn(1));
        assert_eq!(hub.active_channels(), 0);
        assert!(hub.by_name.is_empty(), "never published: freed entirely");

        let (a, _) = hub.subscribe(&name("a"), conn(1));
        hub.publish("a");
        hub.unsubscribe(a, conn(1));
        assert_eq!(hub.find("a"), None);
        assert_eq!(
            hub.subscribe(&name("a"), conn(2)).1,
            1,
            "dormant channel kept its seq"
        );
        assert_eq!(hub.publish("a").0, 2);
    }

    #[test]
    fn publish_without_subscribers_counts_seq() {
        let mut hub = Hub::new();
        let (seq, subscribers) = hub.publish("nobody");
        assert_eq!((seq, subscribers.len()), (1, 0));
        assert_eq!(hub.publish("nobody").0, 2);
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
                hub.unsubscribe(id, conn(round * 10 + i as u32));
            }
        }
        assert_eq!(hub.active_channels(), 0);
        assert!(hub.channels.is_empty());
    }
}
