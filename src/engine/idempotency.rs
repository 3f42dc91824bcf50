//! Publishes remembered by their `idem` key, so that a worker's retry (or a broker's
//! redelivery) is answered with the first result instead of publishing twice.
//!
//! Invariants: at most `limit` keys are kept, each for `window` ticks after its publish;
//! `order` lists the keys in publish order, so the oldest is forgotten first, and every key in
//! `by_key` is in `order` exactly once.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::base::time::Tick;
use crate::publish::Published;

/// How many keys, for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdempotencyLimits {
    /// Keys kept at most (`max_idempotency_keys`); 0 turns `idem` off.
    pub limit: usize,
    /// How long a key is kept, in ticks (`idempotency_window`).
    pub window: u64,
}

/// The remembered publishes.
#[derive(Debug)]
pub struct Idempotency {
    limits: IdempotencyLimits,
    by_key: HashMap<Arc<str>, (Published, Tick)>,
    order: VecDeque<Arc<str>>,
}

impl Idempotency {
    /// An empty memory within `limits`.
    pub fn new(limits: IdempotencyLimits) -> Idempotency {
        Idempotency {
            limits,
            by_key: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The result of the publish made under `key`, if it is still remembered at `now`.
    pub fn recall(&mut self, key: &str, now: Tick) -> Option<Published> {
        self.expire(now);
        self.by_key.get(key).map(|(published, _)| published.clone())
    }

    /// Remembers that the publish under `key` gave `published` at `now`.
    pub fn remember(&mut self, key: &str, published: &Published, now: Tick) {
        if self.limits.limit == 0 {
            return;
        }
        self.expire(now);
        while self.order.len() >= self.limits.limit {
            self.forget_oldest();
        }
        let key: Arc<str> = key.into();
        let previous = self
            .by_key
            .insert(Arc::clone(&key), (published.clone(), now));
        debug_assert!(previous.is_none(), "remember after a recall that missed");
        self.order.push_back(key);
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn expire(&mut self, now: Tick) {
        while let Some(oldest) = self.order.front() {
            let (_, at) = self.by_key[oldest];
            if now.since(at) < self.limits.window {
                return;
            }
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some(key) = self.order.pop_front() {
            self.by_key.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::Seqs;

    fn published(seq: u64) -> Published {
        Published {
            seqs: Seqs::One(seq),
            reach: crate::publish::Reach::Connections {
                delivered: 3,
                skipped: 0,
            },
            duplicate: false,
        }
    }

    #[test]
    fn a_key_is_remembered_within_its_window_and_its_limit() {
        let mut memory = Idempotency::new(IdempotencyLimits {
            limit: 2,
            window: 100,
        });
        assert_eq!(memory.recall("a", Tick(0)), None);
        memory.remember("a", &published(1), Tick(0));
        assert_eq!(memory.recall("a", Tick(99)), Some(published(1)));
        assert_eq!(memory.recall("a", Tick(100)), None, "the window passed");
        memory.remember("b", &published(2), Tick(100));
        memory.remember("c", &published(3), Tick(101));
        memory.remember("d", &published(4), Tick(102));
        assert_eq!(memory.len(), 2, "the limit holds");
        assert_eq!(memory.recall("b", Tick(103)), None, "the oldest went first");
        assert_eq!(memory.recall("d", Tick(103)), Some(published(4)));
    }

    #[test]
    fn a_zero_limit_remembers_nothing() {
        let mut memory = Idempotency::new(IdempotencyLimits {
            limit: 0,
            window: 100,
        });
        memory.remember("a", &published(1), Tick(0));
        assert!(memory.is_empty());
        assert_eq!(memory.recall("a", Tick(0)), None);
    }
}
