//! One channel's order on this node: which event goes out next, which wait for a gap to be
//! filled from the stream, and which losses the channel's subscribers must be told of.
//!
//! Events arrive from the shard channel in the order Redis published them. A node delivers
//! seq `last + 1` only. A later seq means some were missed (a reconnect, a moved slot): it and
//! what follows are held while the stream is read from `last`; the stream's entries and the
//! held events are merged by seq and delivered in order, each hole reported as a gap. A seq
//! at or below `last` was delivered already and is dropped. Another epoch means Redis lost
//! the channel's state: a gap, then the new epoch's events.
//!
//! Invariants: `last` only grows within an epoch; an event is delivered at most once per
//! epoch, in seq order; every seq skipped is covered by a [`Step::Gap`]; events are held only
//! while a read is in flight (`syncing`).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

/// One event of a channel, as published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its seq.
    pub seq: u64,
    /// A `{"user":...}` publish: the user's connections receive it too.
    pub to_user: bool,
    /// The event's `data`, valid JSON.
    pub data: Bytes,
}

/// What the channel's subscribers get next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// This event.
    Deliver(Entry),
    /// Every event up to `seq` of `epoch` that was not delivered is lost.
    Gap {
        /// The last seq lost.
        seq: u64,
        /// The epoch it counts in.
        epoch: Arc<str>,
    },
}

/// A read of the stream to ask for: entries after `since` in `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sync {
    /// The epoch the node knows (`None`: none yet).
    pub epoch: Option<Arc<str>>,
    /// The last seq delivered.
    pub since: u64,
}

/// One channel's delivery order on this node.
#[derive(Debug, Default)]
pub struct Sequencer {
    epoch: Option<Arc<str>>,
    last: u64,
    held: BTreeMap<u64, Entry>,
    syncing: bool,
}

impl Sequencer {
    /// Where delivery stands: the epoch and last seq delivered, once known.
    pub fn position(&self) -> Option<(u64, &Arc<str>)> {
        self.epoch.as_ref().map(|epoch| (self.last, epoch))
    }

    /// Events held while a read is in flight.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Starts a read of the stream (when none is in flight): on (re)subscribing, the channel
    /// may have moved on while this node was not listening.
    pub fn resync(&mut self) -> Option<Sync> {
        if self.syncing {
            return None;
        }
        self.syncing = true;
        Some(Sync {
            epoch: self.epoch.clone(),
            since: self.last,
        })
    }

    /// A read failed (the connection went down): the next resync asks again.
    pub fn abandon_sync(&mut self) {
        self.syncing = false;
    }

    /// An event from the shard channel. Returns the read to make when it reveals a gap.
    pub fn on_event(&mut self, epoch: &str, entry: Entry, out: &mut Vec<Step>) -> Option<Sync> {
        let Some(known) = &self.epoch else {
            // Before the first read answers: that answer covers this event.
            return None;
        };
        if self.syncing {
            if entry.seq > self.last || **known != *epoch {
                self.held.insert(entry.seq, entry);
            }
            return None;
        }
        if **known != *epoch {
            let epoch: Arc<str> = epoch.into();
            out.push(Step::Gap {
                seq: entry.seq - 1,
                epoch: Arc::clone(&epoch),
            });
            self.epoch = Some(epoch);
            self.last = entry.seq;
            out.push(Step::Deliver(entry));
            return None;
        }
        if entry.seq <= self.last {
            return None;
        }
        if entry.seq == self.last + 1 {
            self.last = entry.seq;
            out.push(Step::Deliver(entry));
            return None;
        }
        self.held.insert(entry.seq, entry);
        self.resync()
    }

    /// The answer to a read: the channel is at `seq` of `epoch`, and `entries` (when the read's
    /// epoch was the channel's) are the stream after the read's `since`. Returns the next read
    /// to make, when held events still leave a gap.
    pub fn on_read(
        &mut self,
        epoch: &str,
        seq: u64,
        entries: Option<Vec<Entry>>,
        out: &mut Vec<Step>,
    ) -> Option<Sync> {
        self.syncing = false;
        let held = std::mem::take(&mut self.held);
        match &self.epoch {
            None => {
                self.epoch = Some(epoch.into());
                self.last = seq;
            }
            Some(known) if **known != *epoch => {
                let epoch: Arc<str> = epoch.into();
                out.push(Step::Gap {
                    seq,
                    epoch: Arc::clone(&epoch),
                });
                self.epoch = Some(epoch);
                self.last = seq;
            }
            Some(_) => {
                // The stream's entries and the events held meanwhile, merged by seq.
                let mut merged: BTreeMap<u64, Entry> = entries
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| (e.seq, e))
                    .collect();
                for (s, entry) in held.range(..=seq) {
                    merged.entry(*s).or_insert_with(|| entry.clone());
                }
                let epoch = self.epoch.clone().expect("known");
                for (s, entry) in merged.into_iter().filter(|(s, _)| *s <= seq) {
                    if s <= self.last {
                        continue;
                    }
                    if s > self.last + 1 {
                        out.push(Step::Gap {
                            seq: s - 1,
                            epoch: Arc::clone(&epoch),
                        });
                    }
                    self.last = s;
                    out.push(Step::Deliver(entry));
                }
                if self.last < seq {
                    out.push(Step::Gap { seq, epoch });
                    self.last = seq;
                }
            }
        }
        // Events held past the read's seq were published after it: on as if just arrived.
        let epoch = self.epoch.clone().expect("known");
        let mut next = None;
        for (_, entry) in held.into_iter().filter(|(s, _)| *s > seq) {
            if let Some(sync) = self.on_event(&epoch, entry, out) {
                next = Some(sync);
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            to_user: false,
            data: Bytes::from(seq.to_string()),
        }
    }

    fn delivered(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| match s {
                Step::Deliver(e) => e.seq.to_string(),
                Step::Gap { seq, epoch } => format!("gap {seq} {epoch}"),
            })
            .collect()
    }

    fn at(epoch: &str, seq: u64) -> Sequencer {
        let mut s = Sequencer::default();
        let mut out = vec![];
        s.on_read(epoch, seq, None, &mut out);
        assert!(out.is_empty());
        s
    }

    #[test]
    fn events_before_the_first_read_are_covered_by_it() {
        let mut s = Sequencer::default();
        let mut out = vec![];
        assert_eq!(s.on_event("e", entry(4), &mut out), None);
        s.on_read("e", 4, None, &mut out);
        s.on_event("e", entry(4), &mut out);
        s.on_event("e", entry(5), &mut out);
        assert_eq!(delivered(&out), ["5"]);
    }

    #[test]
    fn a_skipped_seq_is_filled_from_the_stream_merged_with_events_held_meanwhile() {
        let mut s = at("e", 1);
        let mut out = vec![];
        s.on_event("e", entry(2), &mut out);
        let sync = s.on_event("e", entry(5), &mut out).expect("a gap: read");
        assert_eq!(sync.since, 2);
        // Held while the read is in flight, whatever their order.
        s.on_event("e", entry(6), &mut out);
        s.on_event("e", entry(2), &mut out);
        assert_eq!(s.held(), 2);
        // The stream answers up to 6 but has lost 4 (trimmed); 5 and 6 were held.
        let read = s.on_read("e", 6, Some(vec![entry(3)]), &mut out);
        assert_eq!(read, None);
        assert_eq!(delivered(&out), ["2", "3", "gap 4 e", "5", "6"]);
        s.on_event("e", entry(7), &mut out);
        assert_eq!(delivered(&out).last().unwrap(), "7");
    }

    #[test]
    fn events_published_after_the_read_wait_their_turn() {
        let mut s = at("e", 0);
        let mut out = vec![];
        assert!(s.on_event("e", entry(2), &mut out).is_some());
        s.on_event("e", entry(3), &mut out);
        s.on_event("e", entry(5), &mut out);
        // The read saw up to 3; 5 is past it and still leaves 4 missing.
        let next = s.on_read("e", 3, Some(vec![entry(1), entry(2), entry(3)]), &mut out);
        assert_eq!(delivered(&out), ["1", "2", "3"]);
        assert_eq!(next.map(|n| n.since), Some(3));
        s.on_read("e", 5, Some(vec![entry(4), entry(5)]), &mut out);
        assert_eq!(delivered(&out), ["1", "2", "3", "4", "5"]);
    }

    #[test]
    fn a_new_epoch_is_a_gap_never_a_duplicate() {
        let mut s = at("old", 9);
        let mut out = vec![];
        s.on_event("new", entry(1), &mut out);
        s.on_event("new", entry(1), &mut out);
        s.on_event("new", entry(2), &mut out);
        assert_eq!(delivered(&out), ["gap 0 new", "1", "2"]);
        // A resync that finds yet another epoch reports up to its seq.
        let mut out = vec![];
        assert!(s.resync().is_some());
        s.on_read("newer", 3, None, &mut out);
        assert_eq!(delivered(&out), ["gap 3 newer"]);
        assert_eq!(s.position().map(|(seq, e)| (seq, &**e)), Some((3, "newer")));
    }

    #[test]
    fn a_resync_that_finds_nothing_new_says_nothing() {
        let mut s = at("e", 4);
        let mut out = vec![];
        let sync = s.resync().unwrap();
        assert_eq!((sync.epoch.as_deref(), sync.since), (Some("e"), 4));
        assert_eq!(s.resync(), None, "one read at a time");
        s.on_read("e", 4, Some(vec![]), &mut out);
        assert!(out.is_empty());
    }
}
