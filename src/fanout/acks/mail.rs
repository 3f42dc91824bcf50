//! What the nodes that deliver an acknowledged event tell the node that assembles its report
//! (the one its worker published on), through [`Engine::mail`](crate::engine::Engine::mail):
//! Redis pub/sub on that node's mailbox channel, or this node itself.
//!
//! A node that queues the event to pages it then waits for says so at once ([`Mail::Delivered`]),
//! so that if it dies before its [`Mail::Final`], its pages still count, as lost. A node where
//! a page that closed elsewhere resumed and acked says whose it was ([`Mail::Resumed`]): the
//! report takes back one page of that user that closed on another node.
//!
//! Mail is not stored: a message lost with a Redis connection leaves its node unreported, and
//! the report says so at its deadline.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Counts;

/// One node's word on one acknowledged event, for the report `report` of the node it goes to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum Mail {
    /// `node` queued the event to `delivered` pages and waits for their acks.
    Delivered {
        /// The report.
        report: u64,
        /// The node.
        node: Box<str>,
        /// Pages it was queued to.
        delivered: usize,
    },
    /// `node` is done waiting: its counts, and the users (`None` without authentication) of
    /// its pages that closed without acking, which a resume on another node may take back.
    Final {
        /// The report.
        report: u64,
        /// The node.
        node: Box<str>,
        /// Its counts.
        counts: Counts,
        /// The users of its pages that closed without acking.
        gone: Vec<Option<Box<str>>>,
    },
    /// A page of `user` acked the event after resuming on a node where it had not closed.
    Resumed {
        /// The report.
        report: u64,
        /// The page's user.
        user: Option<Box<str>>,
    },
}

impl Mail {
    /// The report it is for.
    pub fn report(&self) -> u64 {
        match self {
            Mail::Delivered { report, .. }
            | Mail::Final { report, .. }
            | Mail::Resumed { report, .. } => *report,
        }
    }

    /// The message, as sent.
    pub fn encode(&self) -> Bytes {
        serde_json::to_vec(self).expect("mail serializes").into()
    }

    /// The mail in `message`, if it is one.
    pub fn decode(message: &[u8]) -> Option<Mail> {
        serde_json::from_slice(message).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_survives_the_trip() {
        let counts = Counts {
            delivered: 3,
            acked: 1,
            timed_out: 1,
            disconnected: 1,
        };
        for mail in [
            Mail::Delivered {
                report: 1 << 40,
                node: "n1".into(),
                delivered: 3,
            },
            Mail::Final {
                report: 7,
                node: "n1".into(),
                counts,
                gone: vec![None, Some("u1".into())],
            },
            Mail::Resumed {
                report: 7,
                user: Some("u\"1".into()),
            },
        ] {
            assert_eq!(Mail::decode(&mail.encode()), Some(mail));
        }
        assert_eq!(Mail::decode(b"{\"t\":\"other\"}"), None);
        assert_eq!(Mail::decode(b"e1:ab:{}"), None);
    }
}
