//! A channel's recent events, kept so a reconnecting client can resume without a gap.
//!
//! Entries are the already-encoded event frames (shared `Bytes`), so keeping and replaying an
//! event copies nothing. Invariants: entries hold consecutive sequence numbers, oldest first;
//! at most `size` entries and `max_bytes` bytes are kept; entries older than `ttl` are dropped
//! whenever the history is touched.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::base::time::Tick;

/// How much history each channel keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Events per channel; 0 disables history.
    pub size: usize,
    /// Bytes of frames per channel.
    pub max_bytes: usize,
    /// Age limit, in ticks. Also how long a channel that never had an event keeps its
    /// epoch after its last subscriber left (see `Hub`).
    pub ttl_ticks: u64,
    /// Channels that never had an event and have no subscriber, kept at most at once.
    pub quiet_channels: usize,
}

impl HistoryLimits {
    /// No history at all.
    pub const DISABLED: HistoryLimits = HistoryLimits {
        size: 0,
        max_bytes: 0,
        ttl_ticks: 0,
        quiet_channels: 0,
    };
}

struct Entry {
    seq: u64,
    at: Tick,
    frame: Bytes,
}

/// One channel's history.
#[derive(Default)]
pub struct History {
    entries: VecDeque<Entry>,
    bytes: usize,
}

/// Change in a history's size, for the hub's totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Events added minus events dropped.
    pub events: isize,
    /// Bytes added minus bytes dropped.
    pub bytes: isize,
}

impl History {
    /// Keeps the frame of event `seq`, dropping what the limits no longer allow.
    pub fn record(&mut self, seq: u64, frame: &Bytes, now: Tick, limits: HistoryLimits) -> Delta {
        if limits.size == 0 || frame.len() > limits.max_bytes {
            // Too big to keep: the history restarts after it, so nothing older can be resumed
            // across the gap.
            let delta = self.clear();
            return delta;
        }
        debug_assert!(self.entries.back().is_none_or(|last| last.seq + 1 == seq));
        self.entries.push_back(Entry {
            seq,
            at: now,
            frame: frame.clone(),
        });
        self.bytes += frame.len();
        let mut delta = Delta {
            events: 1,
            bytes: frame.len() as isize,
        };
        while self.entries.len() > limits.size || self.bytes > limits.max_bytes {
            delta = delta.plus(self.pop_front());
        }
        delta.plus(self.expire(now, limits))
    }

    /// True when it holds no event.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops entries older than the TTL.
    pub fn expire(&mut self, now: Tick, limits: HistoryLimits) -> Delta {
        let mut delta = Delta::default();
        while self
            .entries
            .front()
            .is_some_and(|e| now.since(e.at) >= limits.ttl_ticks)
        {
            delta = delta.plus(self.pop_front());
        }
        delta
    }

    /// The frames of every event after `since`, if the history still holds all of them;
    /// `latest` is the channel's current sequence number.
    pub fn after(&self, since: u64, latest: u64) -> Option<impl Iterator<Item = &Bytes>> {
        if since > latest {
            return None;
        }
        let first = self.entries.front().map_or(latest + 1, |e| e.seq);
        if since + 1 < first {
            return None; // some events after `since` are gone
        }
        Some(
            self.entries
                .iter()
                .filter(move |e| e.seq > since)
                .map(|e| &e.frame),
        )
    }

    /// The frames of the newest `n` events held (fewer if it holds fewer), oldest first.
    pub fn last(&self, n: usize) -> impl Iterator<Item = &Bytes> {
        let skip = self.entries.len().saturating_sub(n);
        self.entries.iter().skip(skip).map(|e| &e.frame)
    }

    fn pop_front(&mut self) -> Delta {
        let entry = self
            .entries
            .pop_front()
            .expect("pop from a non-empty history");
        self.bytes -= entry.frame.len();
        Delta {
            events: -1,
            bytes: -(entry.frame.len() as isize),
        }
    }

    fn clear(&mut self) -> Delta {
        let delta = Delta {
            events: -(self.entries.len() as isize),
            bytes: -(self.bytes as isize),
        };
        self.entries.clear();
        self.bytes = 0;
        delta
    }
}

impl Delta {
    fn plus(self, other: Delta) -> Delta {
        Delta {
            events: self.events + other.events,
            bytes: self.bytes + other.bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HistoryLimits = HistoryLimits {
        size: 3,
        max_bytes: 100,
        ttl_ticks: 50,
        quiet_channels: 0,
    };

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    fn seqs(history: &History, since: u64, latest: u64) -> Option<Vec<usize>> {
        history
            .after(since, latest)
            .map(|frames| frames.map(Bytes::len).collect())
    }

    #[test]
    fn replays_what_it_holds_and_refuses_gaps() {
        let mut history = History::default();
        for seq in 1..=5 {
            history.record(seq, &frame(seq as usize), Tick(0), LIMITS);
        }
        // Holds 3, 4, 5 (frame lengths equal their seq here).
        assert_eq!(seqs(&history, 2, 5), Some(vec![3, 4, 5]));
        assert_eq!(seqs(&history, 4, 5), Some(vec![5]));
        assert_eq!(seqs(&history, 5, 5), Some(vec![]), "nothing missed");
        assert_eq!(seqs(&history, 1, 5), None, "event 2 is gone");
        assert_eq!(seqs(&history, 6, 5), None, "a seq from the future");
    }

    #[test]
    fn bytes_and_ttl_bound_it() {
        let mut history = History::default();
        history.record(1, &frame(60), Tick(0), LIMITS);
        let delta = history.record(2, &frame(60), Tick(10), LIMITS);
        assert_eq!(
            delta,
            Delta {
                events: 0,
                bytes: 0
            },
            "one in, one out"
        );
        assert_eq!(seqs(&history, 1, 2), Some(vec![60]));
        assert_eq!(history.expire(Tick(59), LIMITS), Delta::default());
        assert_eq!(
            history.expire(Tick(60), LIMITS),
            Delta {
                events: -1,
                bytes: -60
            }
        );
        assert_eq!(seqs(&history, 1, 2), None);
        assert_eq!(seqs(&history, 2, 2), Some(vec![]));
    }

    #[test]
    fn disabled_history_only_recovers_when_nothing_was_missed() {
        let mut history = History::default();
        history.record(1, &frame(5), Tick(0), HistoryLimits::DISABLED);
        assert_eq!(seqs(&history, 1, 1), Some(vec![]));
        assert_eq!(seqs(&history, 0, 1), None);
    }
}
