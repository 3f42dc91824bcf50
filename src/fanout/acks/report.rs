//! The reports this node's workers wait for: one per acknowledged publish, assembled from the
//! final counts of every node the event went to (this node's too, by the same mail), and made
//! once all of them are in, or at the deadline plus a grace for mail in transit.
//!
//! The engine says how many nodes the event went to when it answers the publish (one, for the
//! engine that is this node alone). A node that said it delivered and sent no final count by
//! the deadline (it died, or its mail was lost) counts its pages as `lost`; a page that closed
//! on one node and acked after resuming on another is taken back as acked, by user.
//!
//! Invariants: `delivered = acked + timedOut + disconnected + lost` in every report; a report
//! is made exactly once per publish that was stored (a failed publish makes none: its worker
//! got an error), and its slot is freed then, so at most `max_pending_acks` are ever held.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use slab::Slab;

use super::{AckReport, Asker, Counts, Mail};
use crate::base::time::Tick;
use crate::fanout::ops::PublisherRef;
use crate::reactor::timer::{TimerKey, TimerWheel};

/// Who gets a report: the publisher (`None`: nobody, a benchmark's sink) and the command's
/// id, as written.
type Recipient = (Option<PublisherRef>, Box<str>);

/// An acknowledged publish awaiting its nodes' counts.
struct Pending {
    serial: u32,
    /// Whom the report goes to: the publisher, then any retry of it under its `idem` key.
    recipients: Vec<Recipient>,
    idem: Option<Box<str>>,
    channel: Arc<str>,
    /// Its seq, once stored.
    seq: u64,
    /// Nodes the event went to, once the engine answered the publish.
    nodes: Option<usize>,
    /// The final counts received, summed.
    counts: Counts,
    /// Nodes whose final count is in.
    reported: Vec<Box<str>>,
    /// Nodes that said they delivered and whose final count is not in: their pages.
    delivering: Vec<(Box<str>, usize)>,
    /// Users of pages that closed without acking, from the final counts.
    gone: Vec<Option<Box<str>>>,
    /// Users of pages that acked after resuming on a node where they had not closed.
    resumed: Vec<Option<Box<str>>>,
    timer: TimerKey,
}

/// The reports awaited on this node.
pub struct Reports {
    slots: Slab<Pending>,
    /// Slots by `idem` key, for a retry to join.
    by_idem: HashMap<Box<str>, usize>,
    deadlines: TimerWheel<u64>,
    next_serial: u32,
    /// `max_pending_acks`.
    max_pending: usize,
    lines: Vec<AckReport>,
    expired: Vec<u64>,
    made: u64,
    nodes_lost: u64,
}

impl Reports {
    /// None awaited, `max_pending` at most.
    pub fn new(max_pending: usize) -> Reports {
        Reports {
            slots: Slab::new(),
            by_idem: HashMap::new(),
            deadlines: TimerWheel::new(Tick(0)),
            next_serial: 0,
            max_pending,
            lines: Vec::new(),
            expired: Vec::new(),
            made: 0,
            nodes_lost: 0,
        }
    }

    /// Reports awaited, made, and nodes that sent no final count in time.
    pub fn counts(&self) -> (usize, u64, u64) {
        (self.slots.len(), self.made, self.nodes_lost)
    }

    /// Whether another acknowledged publish may be taken.
    pub fn has_room(&self) -> bool {
        self.slots.len() < self.max_pending
    }

    /// Awaits the report of a publish on `channel` by `asker`, made at `deadline` at the
    /// latest; returns its id, for the event's [`AckTag`](crate::engine::AckTag).
    pub fn open(
        &mut self,
        Asker {
            publisher,
            id,
            idem,
        }: Asker<'_>,
        channel: &str,
        deadline: Tick,
    ) -> u64 {
        self.next_serial = self.next_serial.wrapping_add(1);
        let entry = self.slots.vacant_entry();
        let report = (u64::from(self.next_serial) << 32) | entry.key() as u64;
        if let Some(idem) = idem {
            self.by_idem.entry(idem.into()).or_insert(entry.key());
        }
        entry.insert(Pending {
            serial: self.next_serial,
            recipients: vec![(publisher, id.into())],
            idem: idem.map(Into::into),
            channel: channel.into(),
            seq: 0,
            nodes: None,
            counts: Counts::default(),
            reported: Vec::new(),
            delivering: Vec::new(),
            gone: Vec::new(),
            resumed: Vec::new(),
            timer: self.deadlines.insert(deadline, report),
        });
        report
    }

    /// The engine stored publish `report` as `seq`, sent to `nodes` nodes; or, `duplicate`,
    /// found an earlier publish under its `idem` key: then nothing was published, and the
    /// report is that publish's, when it is awaited here, or one that says so.
    pub fn stored(&mut self, report: u64, seq: u64, nodes: usize, duplicate: bool) {
        let Some(slot) = self.slot(report) else {
            return;
        };
        if !duplicate {
            let p = &mut self.slots[slot];
            p.seq = seq;
            p.nodes = Some(nodes);
            self.make_if_complete(slot);
            return;
        }
        let p = self.free(slot);
        for (publisher, id) in p.recipients {
            let idem = p.idem.as_deref().unwrap_or_default();
            if !self.join(idem, publisher, &id) {
                self.duplicate(publisher, &id, &p.channel, seq);
            }
        }
    }

    /// Publish `report` failed: its worker was told, and no report is made.
    pub fn abandon(&mut self, report: u64) {
        if let Some(slot) = self.slot(report) {
            self.free(slot);
        }
    }

    /// A retry of the acknowledged publish made under `idem`: when that one is awaited here,
    /// the retry gets the same report (true); otherwise false, and the caller gives the retry
    /// a report of its own at once, saying it is a duplicate ([`duplicate`](Self::duplicate)).
    pub fn join(&mut self, idem: &str, publisher: Option<PublisherRef>, id: &str) -> bool {
        let Some(&slot) = self.by_idem.get(idem) else {
            return false;
        };
        self.slots[slot].recipients.push((publisher, id.into()));
        true
    }

    /// The report of a retry whose first publish's report was already made (or is made on
    /// another node): it says only that it is a duplicate, and of which event.
    pub fn duplicate(
        &mut self,
        publisher: Option<PublisherRef>,
        id: &str,
        channel: &str,
        seq: u64,
    ) {
        let line = report_line(id, channel, seq, None);
        self.lines.push(AckReport {
            publisher,
            id: id.into(),
            line,
        });
    }

    /// A node's word on one of the reports awaited here (mail for a report already made, or
    /// for another node's, is ignored).
    pub fn on_mail(&mut self, mail: Mail) {
        let Some(slot) = self.slot(mail.report()) else {
            return;
        };
        let p = &mut self.slots[slot];
        match mail {
            Mail::Delivered {
                node, delivered, ..
            } => {
                if !p.reported.contains(&node) {
                    p.delivering.retain(|(n, _)| *n != node);
                    p.delivering.push((node, delivered));
                }
            }
            Mail::Final {
                node, counts, gone, ..
            } => {
                if p.reported.contains(&node) {
                    return;
                }
                p.delivering.retain(|(n, _)| *n != node);
                p.reported.push(node);
                p.counts += counts;
                p.gone.extend(gone);
                self.make_if_complete(slot);
            }
            Mail::Resumed { user, .. } => p.resumed.push(user),
        }
    }

    /// Makes every report whose deadline passed by `now`, with what is in.
    pub fn expire(&mut self, now: Tick) {
        let mut expired = std::mem::take(&mut self.expired);
        self.deadlines.advance(now, &mut expired);
        for report in expired.drain(..) {
            if let Some(slot) = self.slot(report) {
                self.make(slot);
            }
        }
        self.expired = expired;
    }

    /// When the next deadline is due.
    pub fn next_deadline(&self) -> Option<Tick> {
        self.deadlines.next_deadline()
    }

    /// Moves the reports made since the last call to the end of `into`.
    pub fn take(&mut self, into: &mut Vec<AckReport>) {
        into.append(&mut self.lines);
    }

    fn make_if_complete(&mut self, slot: usize) {
        let p = &self.slots[slot];
        if p.nodes.is_some_and(|nodes| p.reported.len() >= nodes) {
            self.make(slot);
        }
    }

    /// Makes the report of `slot`: pages that resumed elsewhere and acked take back pages of
    /// their user that closed; nodes that said they delivered and sent no final count lost
    /// their pages.
    fn make(&mut self, slot: usize) {
        let mut p = self.free(slot);
        for user in &p.resumed {
            if let Some(at) = p.gone.iter().position(|u| u == user) {
                p.gone.swap_remove(at);
                p.counts.disconnected -= 1;
                p.counts.acked += 1;
            }
        }
        let lost: usize = p.delivering.iter().map(|(_, pages)| pages).sum();
        let nodes = p
            .nodes
            .unwrap_or_default()
            .max(p.reported.len() + p.delivering.len());
        let nodes_lost = nodes - p.reported.len();
        self.made += 1;
        self.nodes_lost += nodes_lost as u64;
        let outcome = Outcome {
            counts: Counts {
                delivered: p.counts.delivered + lost,
                ..p.counts
            },
            lost,
            nodes,
            nodes_lost,
        };
        for (publisher, id) in p.recipients {
            let line = report_line(&id, &p.channel, p.seq, Some(&outcome));
            self.lines.push(AckReport {
                publisher,
                id,
                line,
            });
        }
    }

    /// Takes `slot` out, with its deadline and `idem` key.
    fn free(&mut self, slot: usize) -> Pending {
        let p = self.slots.remove(slot);
        self.deadlines.cancel(p.timer);
        if let Some(idem) = &p.idem
            && self.by_idem.get(idem) == Some(&slot)
        {
            self.by_idem.remove(idem);
        }
        p
    }

    fn slot(&self, report: u64) -> Option<usize> {
        let slot = report as u32 as usize;
        let serial = (report >> 32) as u32;
        self.slots
            .get(slot)
            .is_some_and(|p| p.serial == serial)
            .then_some(slot)
    }
}

/// What a report says beyond the counts of the pages that answered or not.
struct Outcome {
    counts: Counts,
    lost: usize,
    nodes: usize,
    nodes_lost: usize,
}

/// An `ack_report` line: with its outcome, or for a retry of a publish already reported,
/// `"duplicate":true` instead.
fn report_line(id: &str, channel: &str, seq: u64, outcome: Option<&Outcome>) -> String {
    let mut line =
        format!("{{\"id\":{id},\"type\":\"ack_report\",\"channel\":\"{channel}\",\"seq\":{seq}");
    let _ = match outcome {
        Some(Outcome {
            counts: c,
            lost,
            nodes,
            nodes_lost,
        }) => writeln!(
            line,
            ",\"delivered\":{},\"acked\":{},\"timedOut\":{},\"disconnected\":{},\"lost\":{lost},\"nodes\":{nodes},\"nodesLost\":{nodes_lost}}}",
            c.delivered, c.acked, c.timed_out, c.disconnected
        ),
        None => writeln!(line, ",\"duplicate\":true}}"),
    };
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asker(id: &'static str, idem: Option<&'static str>) -> Asker<'static> {
        Asker {
            publisher: None,
            id,
            idem,
        }
    }

    fn lines(reports: &mut Reports) -> Vec<String> {
        let mut out = Vec::new();
        reports.take(&mut out);
        out.into_iter().map(|r| r.line).collect()
    }

    fn counts(delivered: usize, acked: usize, timed_out: usize, disconnected: usize) -> Counts {
        Counts {
            delivered,
            acked,
            timed_out,
            disconnected,
        }
    }

    fn final_of(report: u64, node: &str, counts: Counts, gone: &[&str]) -> Mail {
        Mail::Final {
            report,
            node: node.into(),
            counts,
            gone: gone.iter().map(|u| Some((*u).into())).collect(),
        }
    }

    #[test]
    fn one_report_once_every_node_counted_and_it_adds_up() {
        let mut reports = Reports::new(2);
        let r = reports.open(asker("7", None), "order:7", Tick(500));
        reports.on_mail(final_of(r, "n2", counts(2, 1, 1, 0), &[]));
        reports.stored(r, 18, 2, false);
        assert!(lines(&mut reports).is_empty(), "n1 has not counted");
        reports.on_mail(final_of(r, "n2", counts(2, 1, 1, 0), &[]));
        reports.on_mail(final_of(r, "n1", counts(1, 1, 0, 0), &[]));
        assert_eq!(
            lines(&mut reports),
            [
                "{\"id\":7,\"type\":\"ack_report\",\"channel\":\"order:7\",\"seq\":18,\"delivered\":3,\"acked\":2,\"timedOut\":1,\"disconnected\":0,\"lost\":0,\"nodes\":2,\"nodesLost\":0}\n"
            ]
        );
        reports.on_mail(final_of(r, "n3", counts(1, 1, 0, 0), &[]));
        assert!(lines(&mut reports).is_empty(), "exactly one report");
        assert_eq!(reports.counts(), (0, 1, 0));
    }

    #[test]
    fn a_node_that_never_counted_loses_its_pages_at_the_deadline() {
        let mut reports = Reports::new(2);
        let r = reports.open(asker("1", None), "a", Tick(500));
        reports.stored(r, 3, 2, false);
        reports.on_mail(Mail::Delivered {
            report: r,
            node: "n2".into(),
            delivered: 4,
        });
        reports.on_mail(final_of(r, "n1", counts(2, 1, 0, 1), &["u1"]));
        reports.on_mail(Mail::Resumed {
            report: r,
            user: Some("u1".into()),
        });
        reports.expire(Tick(499));
        assert!(lines(&mut reports).is_empty());
        reports.expire(Tick(500));
        let line = lines(&mut reports).concat();
        assert!(
            line.contains("\"delivered\":6,\"acked\":2,\"timedOut\":0,\"disconnected\":0,\"lost\":4,\"nodes\":2,\"nodesLost\":1"),
            "{line}"
        );
        assert_eq!(reports.counts(), (0, 1, 1));
    }

    #[test]
    fn retries_join_or_hear_they_are_duplicates_and_failures_report_nothing() {
        let mut reports = Reports::new(3);
        let first = reports.open(asker("1", Some("k")), "a", Tick(9));
        let retry = reports.open(asker("2", Some("k")), "a", Tick(9));
        reports.stored(retry, 5, 1, true);
        reports.stored(first, 5, 1, false);
        reports.on_mail(final_of(first, "n1", counts(0, 0, 0, 0), &[]));
        let made = lines(&mut reports);
        assert_eq!(made.len(), 2, "{made:?}");
        assert!(made.iter().all(|l| l.contains("\"seq\":5,\"delivered\":0")));
        let late = reports.open(asker("3", Some("k")), "a", Tick(9));
        reports.stored(late, 5, 1, true);
        assert_eq!(
            lines(&mut reports),
            ["{\"id\":3,\"type\":\"ack_report\",\"channel\":\"a\",\"seq\":5,\"duplicate\":true}\n"]
        );
        let failed = reports.open(asker("4", None), "a", Tick(9));
        reports.abandon(failed);
        reports.expire(Tick(9));
        assert!(lines(&mut reports).is_empty());
        assert_eq!(reports.counts().0, 0);
    }
}
