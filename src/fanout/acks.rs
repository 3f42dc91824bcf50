//! Acknowledged events: for each event published with `ack`, the WebSockets it was queued to,
//! how many of them acked, and the one `ack_report` line its worker gets, when the last one
//! answers or at the timeout, whichever comes first.
//!
//! A pending event is one slot; each connection waited on holds its [`AckKey`] in its session
//! (at most `max_unacked_per_connection`), so an ack and a close are O(1) here and nothing is
//! kept per subscriber. Deadlines sit in a timer wheel of their own.
//!
//! The report is due when every connection it went to has answered (none is still waited on,
//! none closed without acking), or at the timeout: a page that closed before acking may
//! resume and ack within the timeout, so its departure does not end the wait.
//!
//! Invariants: `delivered = acked + timed_out + disconnected` in every report; a slot is
//! freed when its report is made, so at most `max_pending_acks` are ever held; a key a
//! session still holds after that is stale, and its serial tells it apart.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use slab::Slab;

use super::ops::PublisherRef;
use crate::base::ids::{AckKey, ConnId};
use crate::base::time::Tick;
use crate::reactor::timer::{TimerKey, TimerWheel};

/// Who gets a report: the publisher (`None`: nobody, a benchmark's sink) and the command's
/// id, as written.
type Recipient = (Option<PublisherRef>, Box<str>);

/// Who asked for an acknowledged publish.
#[derive(Clone, Copy, Debug)]
pub struct Asker<'a> {
    /// The publisher (`None`: nobody to report to).
    pub publisher: Option<PublisherRef>,
    /// The command's id, as written.
    pub id: &'a str,
    /// Its `idem` key, if it had one.
    pub idem: Option<&'a str>,
}

/// An acknowledged event awaiting its pages.
struct Pending {
    serial: u32,
    /// Whom the report goes to: the publisher, then any retry of it under its `idem` key.
    recipients: Vec<Recipient>,
    /// Its `idem` key, if it had one.
    idem: Option<Box<str>>,
    channel: Arc<str>,
    seq: u64,
    delivered: usize,
    acked: usize,
    timed_out: usize,
    disconnected: usize,
    /// Connections still waited on.
    left: usize,
    /// The users (`None` without authentication) of connections that closed before acking:
    /// a connection of the same user that resumes and acks the event takes one of them
    /// back as acked.
    gone: Vec<Option<Box<str>>>,
    /// Connections that acked that way, so each counts once.
    resumed: Vec<ConnId>,
    timer: TimerKey,
}

/// The report a publisher gets, rendered.
#[derive(Debug)]
pub struct AckReport {
    /// Whom it goes to.
    pub publisher: Option<PublisherRef>,
    /// The id of the command it answers, as written.
    pub id: Box<str>,
    /// The line, newline-terminated.
    pub line: String,
}

/// What `/metrics` shows of acknowledged events.
#[derive(Clone, Copy, Debug, Default)]
pub struct AckCounts {
    /// Events awaiting acks.
    pub pending: usize,
    /// Acks received that counted.
    pub received: u64,
    /// Reports made.
    pub reports: u64,
    /// Reports made at the timeout.
    pub timeouts: u64,
}

/// The table of acknowledged events awaiting their pages.
pub(super) struct Acks {
    pending: Slab<Pending>,
    /// Slots by channel and seq (looked up by a client's `&str` without allocating).
    by_event: HashMap<Arc<str>, HashMap<u64, usize>>,
    /// Slots by `idem` key, for a retry to join.
    by_idem: HashMap<Box<str>, usize>,
    deadlines: TimerWheel<AckKey>,
    next_serial: u32,
    /// `max_pending_acks`.
    pub max_pending: usize,
    /// `max_unacked_per_connection`.
    pub per_connection: usize,
    reports: Vec<AckReport>,
    expired: Vec<AckKey>,
    acks_received: u64,
    reports_sent: u64,
    timeouts: u64,
}

impl Acks {
    /// An empty table holding at most `max_pending` events, waiting on a connection for at
    /// most `per_connection` of them.
    pub fn new(max_pending: usize, per_connection: usize) -> Acks {
        Acks {
            pending: Slab::new(),
            by_event: HashMap::new(),
            by_idem: HashMap::new(),
            deadlines: TimerWheel::new(Tick(0)),
            next_serial: 0,
            max_pending,
            per_connection,
            reports: Vec::new(),
            expired: Vec::new(),
            acks_received: 0,
            reports_sent: 0,
            timeouts: 0,
        }
    }

    /// Events awaiting acks, and the counters, for `/metrics`.
    pub fn counts(&self) -> AckCounts {
        AckCounts {
            pending: self.pending.len(),
            received: self.acks_received,
            reports: self.reports_sent,
            timeouts: self.timeouts,
        }
    }

    /// Whether another acknowledged event may be taken.
    pub fn has_room(&self) -> bool {
        self.pending.len() < self.max_pending
    }

    /// Starts waiting for the acks of `channel`'s event `seq`, until `deadline`.
    pub fn open(
        &mut self,
        Asker {
            publisher,
            id,
            idem,
        }: Asker<'_>,
        channel: &Arc<str>,
        seq: u64,
        deadline: Tick,
    ) -> AckKey {
        self.next_serial = self.next_serial.wrapping_add(1);
        let entry = self.pending.vacant_entry();
        let key = AckKey {
            slot: entry.key() as u32,
            serial: self.next_serial,
        };
        if let Some(idem) = idem {
            self.by_idem.insert(idem.into(), key.slot as usize);
        }
        entry.insert(Pending {
            serial: key.serial,
            recipients: vec![(publisher, id.into())],
            idem: idem.map(Into::into),
            channel: Arc::clone(channel),
            seq,
            delivered: 0,
            acked: 0,
            timed_out: 0,
            disconnected: 0,
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

    /// The event was queued to one more connection: waited on, or (`waited` false: the
    /// connection already holds `per_connection` unanswered events) counted as timed out.
    pub fn queued(&mut self, key: AckKey, waited: bool) {
        if let Some(p) = self.get_mut(key) {
            p.delivered += 1;
            if waited {
                p.left += 1;
            } else {
                p.timed_out += 1;
            }
        }
    }

    /// Every connection the event went to is counted: with none waited on, the report is
    /// due at once.
    pub fn all_queued(&mut self, key: AckKey) {
        self.report_if_answered(key);
    }

    /// The pending event `channel`/`seq`, if its report is not made yet.
    pub fn find(&self, channel: &str, seq: u64) -> Option<AckKey> {
        let slot = *self.by_event.get(channel)?.get(&seq)?;
        let serial = self.pending.get(slot)?.serial;
        Some(AckKey {
            slot: slot as u32,
            serial,
        })
    }

    /// A retry of the acknowledged publish made under `idem`: when that one still awaits its
    /// pages, the retry gets the same report (true); otherwise false, and the retry gets a
    /// report of its own at once, saying it is a duplicate ([`duplicate`](Self::duplicate)).
    pub fn join(&mut self, idem: &str, publisher: Option<PublisherRef>, id: &str) -> bool {
        let Some(&slot) = self.by_idem.get(idem) else {
            return false;
        };
        self.pending[slot].recipients.push((publisher, id.into()));
        true
    }

    /// The report of a retry whose first publish's report was already made: its counts are
    /// not kept, so it says only that it is a duplicate, and of which event.
    pub fn duplicate(
        &mut self,
        publisher: Option<PublisherRef>,
        id: &str,
        channel: &str,
        seq: u64,
    ) {
        let line = report_line(id, channel, seq, None);
        self.reports.push(AckReport {
            publisher,
            id: id.into(),
            line,
        });
    }

    /// True while `key`'s report is not made.
    pub fn is_live(&self, key: AckKey) -> bool {
        self.get(key).is_some()
    }

    /// A connection waited on acked.
    pub fn acked(&mut self, key: AckKey) {
        let Some(p) = self.get_mut(key) else {
            return;
        };
        p.acked += 1;
        p.left -= 1;
        self.acks_received += 1;
        self.report_if_answered(key);
    }

    /// Connection `conn` of `user` acked an event it was not waited on for: it counts when a
    /// connection of the same user closed before acking (the page resumed, on this node, and
    /// got the event again), once per connection. Anything else is ignored.
    pub fn resumed(&mut self, key: AckKey, conn: ConnId, user: Option<&str>) {
        let Some(p) = self.get_mut(key) else {
            return;
        };
        if p.resumed.contains(&conn) {
            return;
        }
        let Some(at) = p.gone.iter().position(|u| u.as_deref() == user) else {
            return;
        };
        p.gone.swap_remove(at);
        p.resumed.push(conn);
        p.disconnected -= 1;
        p.acked += 1;
        self.acks_received += 1;
        self.report_if_answered(key);
    }

    /// A connection waited on closed without acking: it may resume and ack before the
    /// timeout, so the report waits for it.
    pub fn gone(&mut self, key: AckKey, user: Option<&str>) {
        if let Some(p) = self.get_mut(key) {
            p.disconnected += 1;
            p.left -= 1;
            p.gone.push(user.map(Into::into));
        }
    }

    /// Reports every event whose timeout passed by `now`.
    pub fn expire(&mut self, now: Tick) {
        let mut expired = std::mem::take(&mut self.expired);
        self.deadlines.advance(now, &mut expired);
        for key in expired.drain(..) {
            if let Some(p) = self.get_mut(key) {
                p.timed_out += p.left;
                p.left = 0;
                self.timeouts += 1;
                self.report(key.slot as usize);
            }
        }
        self.expired = expired;
    }

    /// When the next timeout is due.
    pub fn next_deadline(&self) -> Option<Tick> {
        self.deadlines.next_deadline()
    }

    /// Moves the reports made since the last call to the end of `into`.
    pub fn take_reports(&mut self, into: &mut Vec<AckReport>) {
        into.append(&mut self.reports);
    }

    /// Makes `key`'s report if every connection it went to answered.
    fn report_if_answered(&mut self, key: AckKey) {
        if self
            .get(key)
            .is_some_and(|p| p.left == 0 && p.disconnected == 0)
        {
            self.report(key.slot as usize);
        }
    }

    /// Makes the report of `slot` and frees it.
    fn report(&mut self, slot: usize) {
        let p = self.pending.remove(slot);
        self.deadlines.cancel(p.timer);
        if let Some(seqs) = self.by_event.get_mut(&p.channel) {
            seqs.remove(&p.seq);
            if seqs.is_empty() {
                self.by_event.remove(&p.channel);
            }
        }
        if let Some(idem) = &p.idem {
            self.by_idem.remove(idem);
        }
        self.reports_sent += 1;
        let counts = [p.delivered, p.acked, p.timed_out, p.disconnected];
        for (publisher, id) in p.recipients {
            let line = report_line(&id, &p.channel, p.seq, Some(counts));
            self.reports.push(AckReport {
                publisher,
                id,
                line,
            });
        }
    }

    fn get(&self, key: AckKey) -> Option<&Pending> {
        self.pending
            .get(key.slot as usize)
            .filter(|p| p.serial == key.serial)
    }

    fn get_mut(&mut self, key: AckKey) -> Option<&mut Pending> {
        self.pending
            .get_mut(key.slot as usize)
            .filter(|p| p.serial == key.serial)
    }
}

/// An `ack_report` line: with its counts (delivered, acked, timed out, disconnected), or for
/// a retry of a publish already reported, `"duplicate":true` instead.
fn report_line(id: &str, channel: &str, seq: u64, counts: Option<[usize; 4]>) -> String {
    let mut line =
        format!("{{\"id\":{id},\"type\":\"ack_report\",\"channel\":\"{channel}\",\"seq\":{seq}");
    let _ = match counts {
        Some([delivered, acked, timed_out, disconnected]) => writeln!(
            line,
            ",\"delivered\":{delivered},\"acked\":{acked},\"timedOut\":{timed_out},\"disconnected\":{disconnected}}}"
        ),
        None => writeln!(line, ",\"duplicate\":true}}"),
    };
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> (Acks, AckKey) {
        let mut acks = Acks::new(2, 100);
        let asker = Asker {
            publisher: None,
            id: "7",
            idem: None,
        };
        let key = acks.open(asker, &Arc::from("order:7"), 18, Tick(500));
        (acks, key)
    }

    fn reports(acks: &mut Acks) -> Vec<String> {
        let mut out = Vec::new();
        acks.take_reports(&mut out);
        out.into_iter().map(|r| r.line).collect()
    }

    #[test]
    fn the_report_comes_with_the_last_answer_and_adds_up() {
        let (mut acks, key) = table();
        for waited in [true, true, true, false] {
            acks.queued(key, waited);
        }
        acks.all_queued(key);
        acks.acked(key);
        acks.acked(key);
        assert!(reports(&mut acks).is_empty());
        acks.acked(key);
        assert_eq!(
            reports(&mut acks),
            [
                "{\"id\":7,\"type\":\"ack_report\",\"channel\":\"order:7\",\"seq\":18,\"delivered\":4,\"acked\":3,\"timedOut\":1,\"disconnected\":0}\n"
            ]
        );
        assert!(!acks.is_live(key));
        acks.acked(key);
        assert!(reports(&mut acks).is_empty(), "exactly one report");
        assert_eq!(acks.find("order:7", 18), None);
    }

    #[test]
    fn the_timeout_reports_whoever_did_not_answer_or_left() {
        let (mut acks, key) = table();
        acks.queued(key, true);
        acks.queued(key, true);
        acks.queued(key, true);
        acks.all_queued(key);
        acks.acked(key);
        acks.gone(key, None);
        acks.expire(Tick(499));
        assert!(
            reports(&mut acks).is_empty(),
            "a page that left may come back"
        );
        acks.expire(Tick(500));
        let line = reports(&mut acks).concat();
        assert!(
            line.contains("\"acked\":1,\"timedOut\":1,\"disconnected\":1"),
            "{line}"
        );
        assert_eq!(acks.counts().timeouts, 1);
    }

    #[test]
    fn a_page_that_resumes_counts_once_for_one_that_left() {
        let (mut acks, key) = table();
        acks.queued(key, true);
        acks.queued(key, true);
        acks.all_queued(key);
        acks.gone(key, Some("u1"));
        let other = ConnId {
            key: 9,
            generation: 9,
        };
        acks.resumed(key, other, Some("u2"));
        acks.acked(key);
        assert!(
            reports(&mut acks).is_empty(),
            "u1's page may still come back"
        );
        acks.resumed(key, other, Some("u1"));
        acks.resumed(key, other, Some("u1"));
        let line = reports(&mut acks).concat();
        assert!(
            line.contains("\"acked\":2,\"timedOut\":0,\"disconnected\":0"),
            "{line}"
        );
    }

    #[test]
    fn nobody_to_wait_for_reports_at_once_and_slots_are_bounded() {
        let (mut acks, key) = table();
        acks.all_queued(key);
        assert_eq!(reports(&mut acks).len(), 1);
        assert!(acks.has_room());
        let asker = |id, idem| Asker {
            publisher: None,
            id,
            idem,
        };
        acks.open(asker("1", Some("k")), &Arc::from("a"), 1, Tick(9));
        acks.open(asker("2", None), &Arc::from("a"), 2, Tick(9));
        assert!(!acks.has_room());
        assert_eq!(acks.counts().pending, 2);
        assert!(acks.join("k", None, "3"), "a retry joins the first");
        assert!(!acks.join("other", None, "4"));
        acks.expire(Tick(9));
        let lines = reports(&mut acks);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines.iter().any(|l| l.starts_with("{\"id\":3,")),
            "{lines:?}"
        );
        assert!(!acks.join("k", None, "5"), "reported: nothing to join");
    }
}
