//! This node's channels: channel name → the local connections subscribed to it. It decides
//! who receives an event here; sequence numbers and history are the engine's.
//!
//! Invariants (checked by `check_invariants` in debug builds):
//! - `by_name` and `channels` hold the same channels, under the same names;
//! - every channel has at least one subscriber: the last one leaving frees it, so a
//!   [`ChannelId`] held by a subscribed connection always names that channel.

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexSet;
use indexmap::set::Slice;
use slab::Slab;

use crate::base::channel::ChannelName;
use crate::base::ids::{ChannelId, ConnId};

struct Channel {
    name: Arc<str>,
    /// Insertion-ordered for cache-friendly iteration; O(1) removal by `swap_remove`.
    subscribers: IndexSet<ConnId>,
}

/// What a subscribe changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Joined {
    /// The channel's first local subscriber: the engine starts watching it.
    First,
    /// It had subscribers already (or this connection was one).
    Existing,
}

/// The registry of channels with local subscribers.
#[derive(Default)]
pub struct Hub {
    by_name: HashMap<Arc<str>, usize>,
    channels: Slab<Channel>,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Hub {
        Hub::default()
    }

    /// Channels with at least one subscriber.
    pub fn active_channels(&self) -> usize {
        self.channels.len()
    }

    /// Adds `conn` to `name`'s subscribers (a no-op if it already is one).
    pub fn subscribe(&mut self, name: &ChannelName, conn: ConnId) -> (ChannelId, Joined) {
        let (key, joined) = match self.by_name.get(name.as_str()) {
            Some(&key) => (key, Joined::Existing),
            None => {
                let name: Arc<str> = name.as_str().into();
                let key = self.channels.insert(Channel {
                    name: Arc::clone(&name),
                    subscribers: IndexSet::new(),
                });
                assert!(key <= u32::MAX as usize, "more than 2^32 channels");
                self.by_name.insert(name, key);
                (key, Joined::First)
            }
        };
        self.channels[key].subscribers.insert(conn);
        self.check_invariants();
        (ChannelId::new(key), joined)
    }

    /// Removes `conn` from the channel's subscribers. Returns the channel's name when it was
    /// the last: the channel is freed, and the engine stops watching it.
    pub fn unsubscribe(&mut self, id: ChannelId, conn: ConnId) -> Option<Arc<str>> {
        let key = id.index();
        let Some(channel) = self.channels.get_mut(key) else {
            debug_assert!(false, "unsubscribe from a freed channel");
            return None;
        };
        if !channel.subscribers.swap_remove(&conn) || !channel.subscribers.is_empty() {
            return None;
        }
        let channel = self.channels.remove(key);
        self.by_name.remove(&channel.name);
        self.check_invariants();
        Some(channel.name)
    }

    /// The name of a channel that has subscribers.
    pub fn name(&self, id: ChannelId) -> Arc<str> {
        Arc::clone(&self.channels[id.index()].name)
    }

    /// The channel called `name`, if it has subscribers.
    pub fn find(&self, name: &str) -> Option<ChannelId> {
        self.by_name.get(name).map(|&key| ChannelId::new(key))
    }

    /// The subscribers of `name` (none if it has no channel here).
    pub fn subscribers(&self, name: &str) -> &Slice<ConnId> {
        match self.by_name.get(name) {
            Some(&key) => self.channels[key].subscribers.as_slice(),
            None => Slice::new(),
        }
    }

    #[cfg(debug_assertions)]
    fn check_invariants(&self) {
        debug_assert_eq!(self.by_name.len(), self.channels.len());
        debug_assert!(self.channels.iter().all(|(_, c)| !c.subscribers.is_empty()));
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
    fn subscribe_is_idempotent_and_reports_the_first_subscriber() {
        let mut hub = Hub::new();
        let (a, joined) = hub.subscribe(&name("a"), conn(1));
        assert_eq!(joined, Joined::First);
        assert_eq!(hub.subscribe(&name("a"), conn(1)), (a, Joined::Existing));
        hub.subscribe(&name("a"), conn(2));
        hub.subscribe(&name("b"), conn(3));
        assert_eq!(ids(hub.subscribers("a")), vec![conn(1), conn(2)]);
        assert_eq!(ids(hub.subscribers("b")), vec![conn(3)]);
        assert!(hub.subscribers("nobody").is_empty());
        assert_eq!(hub.active_channels(), 2);
    }

    #[test]
    fn the_last_subscriber_leaving_frees_the_channel() {
        let mut hub = Hub::new();
        let (a, _) = hub.subscribe(&name("a"), conn(1));
        hub.subscribe(&name("a"), conn(2));
        assert_eq!(hub.unsubscribe(a, conn(1)), None);
        assert_eq!(
            hub.unsubscribe(a, conn(1)),
            None,
            "not a subscriber any more"
        );
        assert_eq!(hub.unsubscribe(a, conn(2)).as_deref(), Some("a"));
        assert_eq!(hub.find("a"), None);
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
