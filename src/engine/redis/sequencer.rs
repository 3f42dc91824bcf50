//! One channel's order on this node: which event goes out next, which wait for a gap to be
//! filled from the stream, and which losses the channel's subscribers must be told of.
//!
//! Events arrive from the shard channel in the order Redis published them. A node delivers
//! seq `last + 1` only. A later seq means some were missed (a reconnect, a moved slot): it and
//! what follows are held while the stream is read from `last`; the stream's entries and the
//! held events are merged by seq and delivered in order, each hole reported as a gap. A seq
//! at or below `last` was delivered already and is dropped. Another epoch means Redis lost
//! the channel's state: what this node had not delivered of the old epoch is lost, and the new
//! epoch's events are delivered from seq 1 (read from its stream when they did not all come
//! by the subscription), after one gap that announces the new epoch (`seq` 0 when nothing of
//! the new epoch is missing).
//!
//! Invariants: `last` only grows within an epoch; an event is delivered at most once per
//! epoch, in seq order; every seq skipped is covered by a [`Step::Gap`], and a new epoch is
//! announced by exactly one; events are held only while a read is in flight (`syncing`).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::engine::Entry;

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
    /// The epoch changed and the subscribers have not been told yet: the next step is a gap.
    announce: bool,
    /// Events that arrived while a read was in flight, with their epoch, in arrival order.
    held: Vec<(Arc<str>, Entry)>,
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
                self.held.push((epoch.into(), entry));
            }
            return None;
        }
        if **known != *epoch {
            self.switch(epoch);
        }
        if entry.seq <= self.last {
            return None;
        }
        if entry.seq == self.last + 1 {
            self.step(entry, out);
            return None;
        }
        self.held.push((epoch.into(), entry));
        self.resync()
    }

    /// The answer to a read: the channel is at `seq` of `epoch`, and `entries` are the stream
    /// after the read's `since` (its epoch was the channel's) or from seq 1 (it was not).
    /// Returns the next read to make, when held events still leave a gap.
    pub fn on_read(
        &mut self,
        epoch: &str,
        seq: u64,
        entries: Option<Vec<Entry>>,
        out: &mut Vec<Step>,
    ) -> Option<Sync> {
        self.syncing = false;
        let held = std::mem::take(&mut self.held);
        let mut left = None;
        match &self.epoch {
            None => {
                // The first read only places the channel.
                self.epoch = Some(epoch.into());
                self.last = seq;
            }
            Some(known) => {
                if **known != *epoch {
                    left = Some(Arc::clone(known));
                    self.switch(epoch);
                }
                // The stream's entries and the events of this epoch held meanwhile, merged.
                let mut merged: BTreeMap<u64, Entry> = entries
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| (e.seq, e))
                    .collect();
                for (_, entry) in held.iter().filter(|(e, _)| **e == *epoch) {
                    merged.entry(entry.seq).or_insert_with(|| entry.clone());
                }
                for (_, entry) in merged.into_iter().filter(|(s, _)| *s <= seq) {
                    if entry.seq > self.last {
                        self.step(entry, out);
                    }
                }
                self.lose_to(seq, out);
            }
        }
        // Events held past the read's seq were published after it: on as if just arrived.
        // Those of the epoch just left are covered by its gap.
        let mut next = None;
        for (held_epoch, entry) in held {
            let after = *held_epoch != *epoch || entry.seq > seq;
            if after
                && left.as_ref() != Some(&held_epoch)
                && let Some(sync) = self.on_event(&held_epoch, entry, out)
            {
                next = Some(sync);
            }
        }
        next
    }

    /// Redis began a new epoch: delivery starts over from seq 0, and the next step announces it.
    fn switch(&mut self, epoch: &str) {
        self.epoch = Some(epoch.into());
        self.last = 0;
        self.announce = true;
    }

    /// Delivers `entry` (past `last`), after a gap for the seqs skipped, or the new epoch's.
    fn step(&mut self, entry: Entry, out: &mut Vec<Step>) {
        if entry.seq > self.last + 1 || self.announce {
            self.gap(entry.seq - 1, out);
        }
        self.last = entry.seq;
        out.push(Step::Deliver(entry));
    }

    /// Reports every seq up to `seq` not delivered as lost.
    fn lose_to(&mut self, seq: u64, out: &mut Vec<Step>) {
        if seq > self.last || self.announce {
            self.gap(seq.max(self.last), out);
            self.last = self.last.max(seq);
        }
    }

    fn gap(&mut self, seq: u64, out: &mut Vec<Step>) {
        let epoch = Arc::clone(self.epoch.as_ref().expect("known"));
        out.push(Step::Gap { seq, epoch });
        self.announce = false;
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            to_user: false,
            data: Bytes::from(seq.to_string()),
            ack: None,
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
    fn a_read_that_finds_a_new_epoch_delivers_it_from_seq_1_after_one_gap() {
        // Redis restarted empty; two events of the new epoch were stored before this node
        // read again. They are events to deliver, not losses.
        let mut s = at("old", 3);
        let mut out = vec![];
        assert!(s.resync().is_some());
        let read = s.on_read("new", 2, Some(vec![entry(1), entry(2)]), &mut out);
        assert_eq!(read, None);
        assert_eq!(delivered(&out), ["gap 0 new", "1", "2"]);
        // The stream lost the first (trimmed): one gap covers the old epoch and it.
        let mut s = at("old", 3);
        let mut out = vec![];
        s.resync();
        s.on_read("new", 3, Some(vec![entry(2), entry(3)]), &mut out);
        assert_eq!(delivered(&out), ["gap 1 new", "2", "3"]);
    }

    #[test]
    fn a_live_event_of_a_new_epoch_past_seq_1_reads_the_ones_before_it() {
        let mut s = at("old", 3);
        let mut out = vec![];
        let sync = s
            .on_event("new", entry(3), &mut out)
            .expect("1 and 2 to read");
        assert_eq!((sync.epoch.as_deref(), sync.since), (Some("new"), 0));
        // Held with its epoch while the read is in flight; old-epoch events left behind are
        // covered by the gap.
        s.on_event("new", entry(4), &mut out);
        assert!(out.is_empty());
        s.on_read("new", 3, Some(vec![entry(1), entry(2), entry(3)]), &mut out);
        assert_eq!(delivered(&out), ["gap 0 new", "1", "2", "3", "4"]);
    }

    #[test]
    fn events_of_the_old_epoch_held_when_a_read_finds_a_new_one_are_covered_by_its_gap() {
        let mut s = at("old", 3);
        let mut out = vec![];
        assert!(s.on_event("old", entry(5), &mut out).is_some());
        s.on_event("new", entry(1), &mut out);
        s.on_read("new", 0, Some(vec![]), &mut out);
        assert_eq!(delivered(&out), ["gap 0 new", "1"]);
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
