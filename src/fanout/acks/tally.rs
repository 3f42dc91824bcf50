//! This node's count of each acknowledged event it delivered: the pages it queued the event
//! to, which of them acked, and its [`Mail`] to the node assembling the report, when the last
//! one answers or at the deadline, whichever comes first.
//!
//! A tally is one slot; each page waited on holds the tally's [`AckKey`] in its session (at
//! most `max_unacked_per_connection`), so an ack and a close are O(1) here and nothing is kept
//! per subscriber. A page that closed before acking may resume and ack before the deadline,
//! so its departure does not end the wait. An event this node only replayed, to a page that
//! resumed here, gets a tally that does not take part: it only passes that page's ack on.
//!
//! Invariants: `delivered = acked + timed_out + disconnected` in every final count; a tally
//! is freed at its final count or its deadline, and a key a session still holds after that is
//! stale, told apart by its serial; a page counts once.

use std::collections::HashMap;
use std::sync::Arc;

use slab::Slab;

use super::{Counts, Mail};
use crate::base::ids::{AckKey, ConnId};
use crate::base::time::Tick;
use crate::engine::AckTag;
use crate::reactor::timer::{TimerKey, TimerWheel};

/// One acknowledged event on this node.
struct Tally {
    serial: u32,
    channel: Arc<str>,
    seq: u64,
    tag: AckTag,
    /// This node delivered the event (false: it only replayed it to a resuming page).
    takes_part: bool,
    counts: Counts,
    /// Pages still waited on.
    left: usize,
    /// The users (`None` without authentication) of pages that closed before acking: a page
    /// of the same user that resumes and acks takes one of them back as acked.
    gone: Vec<Option<Box<str>>>,
    /// Pages that acked after resuming, so each counts once.
    resumed: Vec<ConnId>,
    timer: TimerKey,
}

/// The acknowledged events this node delivered or replayed, until each one's count is final.
pub struct Tallies {
    /// This node's name, in its mail.
    node: Box<str>,
    slots: Slab<Tally>,
    /// Slots by channel and seq (looked up by a client's `&str` without allocating).
    by_event: HashMap<Arc<str>, HashMap<u64, usize>>,
    deadlines: TimerWheel<AckKey>,
    next_serial: u32,
    /// `max_unacked_per_connection`.
    pub per_connection: usize,
    outbox: Vec<(Arc<str>, Mail)>,
    expired: Vec<AckKey>,
    received: u64,
    timeouts: u64,
}

impl Tallies {
    /// No tallies, on node `node`, waiting on a page for at most `per_connection` events.
    pub fn new(node: &str, per_connection: usize) -> Tallies {
        Tallies {
            node: node.into(),
            slots: Slab::new(),
            by_event: HashMap::new(),
            deadlines: TimerWheel::new(Tick(0)),
            next_serial: 0,
            per_connection,
            outbox: Vec::new(),
            expired: Vec::new(),
            received: 0,
            timeouts: 0,
        }
    }

    /// Tallies held, acks that counted, and tallies that ended at their deadline.
    pub fn counts(&self) -> (usize, u64, u64) {
        (self.slots.len(), self.received, self.timeouts)
    }

    /// Starts counting `channel`'s event `seq`, until `deadline`; `takes_part` when this node
    /// delivers it (not only replays it).
    pub fn open(
        &mut self,
        channel: &Arc<str>,
        seq: u64,
        tag: &AckTag,
        deadline: Tick,
        takes_part: bool,
    ) -> AckKey {
        self.next_serial = self.next_serial.wrapping_add(1);
        let entry = self.slots.vacant_entry();
        let key = AckKey {
            slot: entry.key() as u32,
            serial: self.next_serial,
        };
        entry.insert(Tally {
            serial: key.serial,
            channel: Arc::clone(channel),
            seq,
            tag: tag.clone(),
            takes_part,
            counts: Counts::default(),
            left: 0,
            gone: Vec::new(),
            resumed: Vec::new(),
            timer: self.deadlines.insert(deadline, key),
        });
        self.by_event
            .entry(Arc::clone(channel))
            .or_default()
            .insert(seq, key.slot as usize);
        key
    }

    /// The event was queued to one more page: waited on, or (`waited` false: the page
    /// already holds `per_connection` unanswered events) counted as timed out.
    pub fn queued(&mut self, key: AckKey, waited: bool) {
        if let Some(t) = self.get_mut(key) {
            t.counts.delivered += 1;
            if waited {
                t.left += 1;
            } else {
                t.counts.timed_out += 1;
            }
        }
    }

    /// Every page the event went to is counted: with none waited on, the count is final at
    /// once; otherwise the report's node hears how many this node waits for.
    pub fn all_queued(&mut self, key: AckKey) {
        if self.finish_if_answered(key) {
            return;
        }
        let Some(t) = self.get(key) else {
            return;
        };
        if *t.tag.origin != *self.node {
            let mail = Mail::Delivered {
                report: t.tag.report,
                node: self.node.clone(),
                delivered: t.counts.delivered,
            };
            let to = Arc::clone(&t.tag.origin);
            self.outbox.push((to, mail));
        }
    }

    /// The live tally of `channel`/`seq`, if any.
    pub fn find(&self, channel: &str, seq: u64) -> Option<AckKey> {
        let slot = *self.by_event.get(channel)?.get(&seq)?;
        let serial = self.slots.get(slot)?.serial;
        Some(AckKey {
            slot: slot as u32,
            serial,
        })
    }

    /// True while `key`'s tally is not final.
    pub fn is_live(&self, key: AckKey) -> bool {
        self.get(key).is_some()
    }

    /// A page waited on acked.
    pub fn acked(&mut self, key: AckKey) {
        let Some(t) = self.get_mut(key) else {
            return;
        };
        t.counts.acked += 1;
        t.left -= 1;
        self.received += 1;
        self.finish_if_answered(key);
    }

    /// Page `conn` of `user` acked an event it was not waited on for: it resumed and got the
    /// event again. It takes back a page of the same user that closed here, or, if none did,
    /// its ack goes to the report, which matches it against pages closed on other nodes.
    /// Once per page.
    pub fn resumed(&mut self, key: AckKey, conn: ConnId, user: Option<&str>) {
        let Some(t) = self.get_mut(key) else {
            return;
        };
        if t.resumed.contains(&conn) {
            return;
        }
        t.resumed.push(conn);
        match t.gone.iter().position(|u| u.as_deref() == user) {
            Some(at) => {
                t.gone.swap_remove(at);
                t.counts.disconnected -= 1;
                t.counts.acked += 1;
                self.finish_if_answered(key);
            }
            None => {
                let mail = Mail::Resumed {
                    report: t.tag.report,
                    user: user.map(Into::into),
                };
                let to = Arc::clone(&t.tag.origin);
                self.outbox.push((to, mail));
            }
        }
        self.received += 1;
    }

    /// A page waited on closed without acking: it may resume and ack before the deadline,
    /// so the count waits for it.
    pub fn gone(&mut self, key: AckKey, user: Option<&str>) {
        if let Some(t) = self.get_mut(key) {
            t.counts.disconnected += 1;
            t.left -= 1;
            t.gone.push(user.map(Into::into));
        }
    }

    /// Ends every tally whose deadline passed by `now`: pages not answered timed out.
    pub fn expire(&mut self, now: Tick) {
        let mut expired = std::mem::take(&mut self.expired);
        self.deadlines.advance(now, &mut expired);
        for key in expired.drain(..) {
            if let Some(t) = self.get_mut(key) {
                t.counts.timed_out += t.left;
                t.left = 0;
                if t.takes_part {
                    self.timeouts += 1;
                }
                self.finish(key.slot as usize);
            }
        }
        self.expired = expired;
    }

    /// When the next deadline is due.
    pub fn next_deadline(&self) -> Option<Tick> {
        self.deadlines.next_deadline()
    }

    /// Moves the mail made since the last call, with whom it goes to, to the end of `into`.
    pub fn take_mail(&mut self, into: &mut Vec<(Arc<str>, Mail)>) {
        into.append(&mut self.outbox);
    }

    /// Ends `key`'s tally if every page it was queued to answered; returns whether it did.
    fn finish_if_answered(&mut self, key: AckKey) -> bool {
        let answered = self
            .get(key)
            .is_some_and(|t| t.takes_part && t.left == 0 && t.counts.disconnected == 0);
        if answered {
            self.finish(key.slot as usize);
        }
        answered
    }

    /// Frees `slot`, telling the report's node its final count if it took part.
    fn finish(&mut self, slot: usize) {
        let t = self.slots.remove(slot);
        self.deadlines.cancel(t.timer);
        if let Some(seqs) = self.by_event.get_mut(&t.channel) {
            seqs.remove(&t.seq);
            if seqs.is_empty() {
                self.by_event.remove(&t.channel);
            }
        }
        if t.takes_part {
            let mail = Mail::Final {
                report: t.tag.report,
                node: self.node.clone(),
                counts: t.counts,
                gone: t.gone,
            };
            self.outbox.push((t.tag.origin, mail));
        }
    }

    fn get(&self, key: AckKey) -> Option<&Tally> {
        self.slots
            .get(key.slot as usize)
            .filter(|t| t.serial == key.serial)
    }

    fn get_mut(&mut self, key: AckKey) -> Option<&mut Tally> {
        self.slots
            .get_mut(key.slot as usize)
            .filter(|t| t.serial == key.serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(origin: &str) -> AckTag {
        AckTag {
            origin: origin.into(),
            report: 9,
            deadline_ms: 0,
        }
    }

    fn mail(tallies: &mut Tallies) -> Vec<Mail> {
        let mut out = Vec::new();
        tallies.take_mail(&mut out);
        out.into_iter().map(|(_, mail)| mail).collect()
    }

    fn final_counts(mail: &[Mail]) -> Option<Counts> {
        mail.iter().find_map(|m| match m {
            Mail::Final { counts, .. } => Some(*counts),
            _ => None,
        })
    }

    #[test]
    fn the_final_count_comes_with_the_last_answer_and_adds_up() {
        let mut tallies = Tallies::new("n1", 100);
        let key = tallies.open(&Arc::from("order:7"), 18, &tag("n1"), Tick(500), true);
        for waited in [true, true, false] {
            tallies.queued(key, waited);
        }
        tallies.all_queued(key);
        assert!(mail(&mut tallies).is_empty(), "no early word to itself");
        tallies.acked(key);
        assert!(mail(&mut tallies).is_empty());
        tallies.acked(key);
        let counts = final_counts(&mail(&mut tallies)).expect("final");
        assert_eq!(
            counts,
            Counts {
                delivered: 3,
                acked: 2,
                timed_out: 1,
                disconnected: 0
            }
        );
        assert!(!tallies.is_live(key));
        tallies.acked(key);
        assert!(mail(&mut tallies).is_empty(), "final once");
    }

    #[test]
    fn another_node_hears_of_the_delivery_at_once_and_of_a_page_that_left_at_the_deadline() {
        let mut tallies = Tallies::new("n2", 100);
        let key = tallies.open(&Arc::from("a"), 1, &tag("n1"), Tick(500), true);
        tallies.queued(key, true);
        tallies.queued(key, true);
        tallies.all_queued(key);
        let early = mail(&mut tallies);
        assert!(
            matches!(&early[..], [Mail::Delivered { delivered: 2, .. }]),
            "{early:?}"
        );
        tallies.acked(key);
        tallies.gone(key, Some("u1"));
        tallies.expire(Tick(499));
        assert!(mail(&mut tallies).is_empty(), "u1 may come back");
        tallies.expire(Tick(500));
        let last = mail(&mut tallies);
        let Some(Mail::Final { counts, gone, .. }) = last.first() else {
            panic!("{last:?}");
        };
        assert_eq!((counts.acked, counts.disconnected), (1, 1));
        assert_eq!(gone, &[Some("u1".into())]);
        assert_eq!(tallies.counts(), (0, 1, 1));
    }

    #[test]
    fn a_resumed_page_counts_once_here_or_is_passed_on() {
        let mut tallies = Tallies::new("n1", 100);
        let key = tallies.open(&Arc::from("a"), 1, &tag("n1"), Tick(500), true);
        tallies.queued(key, true);
        tallies.all_queued(key);
        tallies.gone(key, Some("u1"));
        let other = ConnId {
            key: 2,
            generation: 2,
        };
        tallies.resumed(key, other, Some("u2"));
        assert!(
            matches!(&mail(&mut tallies)[..], [Mail::Resumed { user: Some(u), .. }] if &**u == "u2"),
            "not closed here: passed on"
        );
        let mine = ConnId {
            key: 3,
            generation: 3,
        };
        tallies.resumed(key, mine, Some("u1"));
        tallies.resumed(key, mine, Some("u1"));
        let counts = final_counts(&mail(&mut tallies)).expect("final");
        assert_eq!((counts.acked, counts.disconnected), (1, 0));

        let replayed = tallies.open(&Arc::from("b"), 4, &tag("n3"), Tick(500), false);
        tallies.resumed(replayed, mine, None);
        assert!(matches!(&mail(&mut tallies)[..], [Mail::Resumed { .. }]));
        tallies.expire(Tick(500));
        assert!(mail(&mut tallies).is_empty(), "a replay reports no count");
    }
}
