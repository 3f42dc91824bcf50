//! Acknowledged events: every node that delivers one counts its pages' acks ([`tally`]), and
//! the node whose worker published it assembles one `ack_report` from their counts
//! ([`report`]), sent by [`mail`] through the engine: Redis pub/sub between nodes, or within
//! the call on one node. One path for both engines: on one node, the node is the only one
//! counting and the only one reporting.
//!
//! ```text
//!  publish ─► Reports::open (id) ─► engine: the event + AckTag{origin, report, deadline}
//!  every node's delivery ─► Tallies::open ─► pages ack or close ─► Mail::Final ─► origin
//!  origin: the engine's answer (nodes) + every node's Final ─► one ack_report
//! ```
//!
//! Invariants: each is bounded (reports by `max_pending_acks`, tallies by the reports of every
//! node and freed at their deadline, at most `max_ack_timeout` away); a worker whose publish
//! was stored gets exactly one report, whose counts add up.

pub mod mail;
pub mod report;
pub mod tally;

use std::ops::AddAssign;

use serde::{Deserialize, Serialize};

use super::ops::PublisherRef;
pub use mail::Mail;
pub use report::Reports;
pub use tally::Tallies;

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

/// Pages an acknowledged event was queued to, and what became of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Queued to.
    #[serde(rename = "d")]
    pub delivered: usize,
    /// Acked.
    #[serde(rename = "a")]
    pub acked: usize,
    /// Still open and silent at the deadline, or over `max_unacked_per_connection`.
    #[serde(rename = "t")]
    pub timed_out: usize,
    /// Closed without acking, and not back in time.
    #[serde(rename = "x")]
    pub disconnected: usize,
}

impl AddAssign for Counts {
    fn add_assign(&mut self, other: Counts) {
        self.delivered += other.delivered;
        self.acked += other.acked;
        self.timed_out += other.timed_out;
        self.disconnected += other.disconnected;
    }
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
    /// Reports awaited by this node's workers.
    pub pending: usize,
    /// Events this node delivered or replayed whose pages' acks it is counting.
    pub tallies: usize,
    /// Acks received that counted.
    pub received: u64,
    /// Reports made.
    pub reports: u64,
    /// Tallies that ended at their deadline.
    pub timeouts: u64,
    /// Nodes that sent no final count before a report's deadline.
    pub nodes_lost: u64,
}

impl AckCounts {
    /// The counts of both tables.
    pub fn of(tallies: &Tallies, reports: &Reports) -> AckCounts {
        let (tallies, received, timeouts) = tallies.counts();
        let (pending, reports, nodes_lost) = reports.counts();
        AckCounts {
            pending,
            tallies,
            received,
            reports,
            timeouts,
            nodes_lost,
        }
    }
}
