//! Publishes in flight: one entry per publish command from its start until every part (one
//! per channel) is answered by the engine's [`Happening::Done`](crate::engine::Happening),
//! and the publisher it answers. The memory engine answers within the call, so a publish is
//! done before [`Serving::publish`] returns; the Redis engine answers later, and the answer
//! becomes a [`Completion`] the reactor hands to its publisher.
//!
//! Invariants: every op is completed exactly once, when its last part is answered; a publish
//! is answered `ok` only when every part was stored; its reach is the nodes Redis counted, or
//! the connections this node queued it to (the engine that is this node alone).

use std::sync::Arc;

use serde_json::value::RawValue;
use slab::Slab;

use super::acks::Asker;
use super::{DELIVERIES_PER_PASS, Fanout};
use crate::base::channel::user_channel;
use crate::engine::{AckTag, Event, OpId, Part, Stored, Unavailable};
use crate::publish::{AckAsk, Outcome, Published, Reach, Seqs, Sink, Target};

/// The `error` of an acknowledged publish refused because `max_pending_acks` events already
/// await their acks (retryable).
pub const ACK_CAPACITY: &str = "ack_capacity";

/// The publisher a command's answer goes back to: its slab key, and its serial (a stale key
/// is told apart by its serial).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublisherRef {
    /// The key in the reactor's publisher slab.
    pub key: usize,
    /// Unique per accepted publisher.
    pub serial: u64,
}

/// A publisher's answered command, for the reactor to hand to that publisher.
#[derive(Debug)]
pub struct Completion {
    /// Who asked (`None`: nobody to hand it to).
    pub publisher: Option<PublisherRef>,
    /// The ticket its command was given.
    pub ticket: u64,
    /// The answer.
    pub outcome: Outcome,
}

/// What a publish's answer looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// One channel (or a user's): one seq.
    One,
    /// Several channels: their seqs, in order.
    Many,
    /// A broadcast: no seq.
    Broadcast,
    /// A `disconnect`: no seq; the connections closed.
    Disconnect,
}

/// A publish in flight.
struct Op {
    /// `None`: the node's own stats feed, neither answered nor counted as an event.
    from: Option<PublisherRef>,
    ticket: u64,
    shape: Shape,
    idem: Option<Box<str>>,
    /// Parts not answered yet.
    waiting: usize,
    unavailable: bool,
    seqs: Seqs,
    /// Nodes reached, summed over the parts, while every part counted them.
    nodes: Option<usize>,
    /// Connections of this node it was queued to (or closed, for a disconnect).
    delivered: usize,
    /// Connections of this node subscribed that it was not queued to (closing, or too slow).
    skipped: usize,
    duplicate: bool,
    /// An acknowledged publish: its report's id.
    ack: Option<u64>,
}

/// What an acknowledged publish is held to.
struct AckTerms {
    /// The command's id, as written.
    id: Box<str>,
    /// When its pages' wait ends, in Unix milliseconds (the same for every node).
    deadline_ms: u64,
}

/// A publish just started.
#[derive(Clone, Copy)]
struct Started {
    op: OpId,
    ticket: u64,
}

impl Started {
    fn part(self, index: usize) -> Part {
        Part { op: self.op, index }
    }
}

/// The publishes in flight.
#[derive(Default)]
pub(super) struct Ops {
    table: Slab<Op>,
    next_ticket: u64,
    completions: Vec<Completion>,
}

impl Ops {
    /// A ticket for a command's answer.
    pub fn next_ticket(&mut self) -> u64 {
        self.next_ticket += 1;
        self.next_ticket
    }

    fn start(
        &mut self,
        from: Option<PublisherRef>,
        shape: Shape,
        parts: usize,
        idem: Option<&str>,
    ) -> Started {
        let ticket = self.next_ticket();
        let seqs = match shape {
            Shape::One => Seqs::One(0),
            Shape::Many => Seqs::Many(vec![0; parts]),
            Shape::Broadcast | Shape::Disconnect => Seqs::None,
        };
        let op = self.table.insert(Op {
            from,
            ticket,
            shape,
            idem: idem.map(Into::into),
            waiting: parts,
            unavailable: false,
            seqs,
            nodes: Some(0),
            delivered: 0,
            skipped: 0,
            duplicate: true,
            ack: None,
        });
        Started { op, ticket }
    }

    /// Connections of this node an answer of publish `from` reached, and those it passed
    /// over.
    pub fn reached(&mut self, from: Option<OpId>, connections: usize, skipped: usize) {
        if let Some(op) = from.and_then(|op| self.table.get_mut(op)) {
            op.delivered += connections;
            op.skipped += skipped;
        }
    }
}

/// The fan-out executing one publisher's commands: its answers go back to that publisher.
pub struct Serving<'a> {
    fanout: &'a mut Fanout,
    from: Option<PublisherRef>,
}

impl Fanout {
    /// The sink for the commands of publisher `from` (`None`: one whose answers are only
    /// ever given at once, as in benchmarks).
    pub fn serving(&mut self, from: Option<PublisherRef>) -> Serving<'_> {
        Serving { fanout: self, from }
    }

    /// Moves the publishes answered since the last call to the end of `into`.
    pub fn take_completions(&mut self, into: &mut Vec<Completion>) {
        into.append(&mut self.ops.completions);
    }

    /// A publish: a retry of one remembered under `idem` is answered with it; otherwise each
    /// part is asked of the engine, and the answer is given now if the engine answered
    /// within the call, or later as a [`Completion`].
    pub(super) fn execute(
        &mut self,
        from: Option<PublisherRef>,
        target: &Target<'_>,
        data: &RawValue,
        idem: Option<&str>,
        ack: Option<AckAsk<'_>>,
    ) -> Outcome {
        let now = self.pass.now;
        let ack = match ack.map(|ack| self.ack_terms(ack)).transpose() {
            Ok(ack) => ack,
            Err(refused) => return refused,
        };
        if let Some(key) = idem
            && let Some(first) = self.engine.recall(key, now)
        {
            self.metrics.publish_duplicates += 1;
            if let (Some(terms), Seqs::One(seq), Some(channel)) =
                (&ack, &first.seqs, target.channel_name())
                && !self.reports.join(key, from, &terms.id)
            {
                self.reports.duplicate(from, &terms.id, &channel, *seq);
            }
            return Outcome::Done(Published {
                duplicate: true,
                ..first
            });
        }
        if ack.is_some() && !self.reports.has_room() {
            return Outcome::Refused {
                error: ACK_CAPACITY.into(),
                retry: true,
            };
        }
        let data = data.get().as_bytes();
        let started = match target {
            Target::Broadcast => {
                let started = self.ops.start(from, Shape::Broadcast, 1, idem);
                let asked = self.engine.broadcast(started.op, data, now);
                self.asked(started.part(0), asked);
                started
            }
            Target::Channel(channel) => {
                let started = self.ops.start(from, Shape::One, 1, idem);
                let tag = ack.map(|terms| self.open_report(started.op, terms, channel));
                let event = Event {
                    channel,
                    data,
                    to_user: false,
                    idem,
                    ack: tag.as_ref(),
                };
                self.publish_part(started.part(0), &event);
                started
            }
            Target::Channels(channels) => {
                let started = self.ops.start(from, Shape::Many, channels.len(), idem);
                for (index, channel) in channels.iter().enumerate() {
                    let event = Event {
                        channel,
                        data,
                        to_user: false,
                        idem,
                        ack: None,
                    };
                    self.publish_part(started.part(index), &event);
                }
                started
            }
            Target::User(user) => {
                let started = self.ops.start(from, Shape::One, 1, idem);
                let channel = user_channel(user);
                let tag = ack.map(|terms| self.open_report(started.op, terms, &channel));
                let event = Event {
                    channel: &channel,
                    data,
                    to_user: true,
                    idem,
                    ack: tag.as_ref(),
                };
                self.publish_part(started.part(0), &event);
                started
            }
        };
        self.settle(started)
    }

    /// What an acknowledged publish is held to, or why it is refused: a timeout over
    /// `max_ack_timeout`.
    fn ack_terms(&self, ack: AckAsk<'_>) -> Result<AckTerms, Outcome> {
        let max = self.settings.max_ack_timeout;
        if ack.timeout > max {
            let max = humantime::format_duration(max);
            let error = format!("ack timeout over max_ack_timeout ({max})");
            return Err(Outcome::Refused {
                error,
                retry: false,
            });
        }
        Ok(AckTerms {
            id: ack.id.get().into(),
            deadline_ms: self.pass.unix_ms + ack.timeout.as_millis() as u64,
        })
    }

    /// Awaits the report of acknowledged publish `op` on `channel`, until its deadline and
    /// `ack_grace` past it: the tag its event carries to every node.
    fn open_report(&mut self, op: OpId, terms: AckTerms, channel: &str) -> AckTag {
        let grace = self.settings.ack_grace;
        let deadline = self.pass.tick_of(
            terms.deadline_ms + grace.as_millis() as u64,
            self.settings.max_ack_timeout + grace,
        );
        let op_entry = &mut self.ops.table[op];
        let asker = Asker {
            publisher: op_entry.from,
            id: &terms.id,
            idem: op_entry.idem.as_deref(),
        };
        let report = self.reports.open(asker, channel, deadline);
        op_entry.ack = Some(report);
        AckTag {
            origin: Arc::clone(&self.node),
            report,
            deadline_ms: terms.deadline_ms,
        }
    }

    fn publish_part(&mut self, part: Part, event: &Event<'_>) {
        let asked = self.engine.publish(part, event, self.pass.now);
        self.asked(part, asked);
    }

    /// An engine call for `part` returned: carries out its answers, or counts the part
    /// failed when it could not even be asked.
    fn asked(&mut self, part: Part, asked: Result<(), Unavailable>) {
        match asked {
            Ok(()) => self.apply(),
            Err(Unavailable) => self.on_done(part, Err(Unavailable)),
        }
    }

    /// A `disconnect`: every connection of `user`, on every node.
    fn disconnect(&mut self, from: Option<PublisherRef>, user: &str) -> Outcome {
        let started = self.ops.start(from, Shape::Disconnect, 1, None);
        let asked = self.engine.disconnect(started.op, user, self.pass.now);
        self.asked(started.part(0), asked);
        self.settle(started)
    }

    /// What the publisher is told now: the answer when the engine gave it within the call
    /// (taken back from the completions), else a ticket for the answer to come.
    fn settle(&mut self, Started { op, ticket }: Started) -> Outcome {
        if self.ops.table.contains(op) {
            return Outcome::Waiting(ticket);
        }
        self.take_completion(ticket)
            .expect("an op done within the call")
    }

    /// The answer for `ticket`, if it was given within the call (taken back from the
    /// completions).
    pub(super) fn take_completion(&mut self, ticket: u64) -> Option<Outcome> {
        let completions = &mut self.ops.completions;
        let done = completions.iter().rposition(|c| c.ticket == ticket)?;
        Some(completions.remove(done).outcome)
    }

    /// Answers `ticket` of publisher `from` (a question that is no publish).
    pub(super) fn complete(&mut self, from: Option<PublisherRef>, ticket: u64, outcome: Outcome) {
        self.ops.completions.push(Completion {
            publisher: from,
            ticket,
            outcome,
        });
    }

    /// Part `part` answered: once all are, the publish is done.
    pub(super) fn on_done(&mut self, part: Part, result: Result<Stored, Unavailable>) {
        let Some(op) = self.ops.table.get_mut(part.op) else {
            return;
        };
        op.waiting -= 1;
        match result {
            Err(Unavailable) => op.unavailable = true,
            Ok(stored) => {
                match &mut op.seqs {
                    Seqs::One(seq) => *seq = stored.seq,
                    Seqs::Many(seqs) => seqs[part.index] = stored.seq,
                    Seqs::None => {}
                }
                op.nodes = op.nodes.zip(stored.nodes).map(|(a, b)| a + b);
                op.duplicate &= stored.duplicate;
            }
        }
        if op.waiting > 0 {
            return;
        }
        let mut op = self.ops.table.remove(part.op);
        if let Some(report) = op.ack {
            match (op.unavailable, &op.seqs) {
                (false, Seqs::One(seq)) => {
                    let nodes = op.nodes.unwrap_or(1);
                    self.reports.stored(report, *seq, nodes, op.duplicate);
                }
                _ => self.reports.abandon(report),
            }
        }
        let outcome = self.outcome(&mut op);
        if let (Some(key), Outcome::Done(published)) = (&op.idem, &outcome)
            && !published.duplicate
        {
            self.engine.remember(key, published, self.pass.now);
        }
        self.ops.completions.push(Completion {
            publisher: op.from,
            ticket: op.ticket,
            outcome,
        });
    }

    /// A finished op's answer (its seqs taken out of it), counted.
    fn outcome(&mut self, op: &mut Op) -> Outcome {
        if op.unavailable {
            self.metrics.publish_unavailable += 1;
            return Outcome::Unavailable;
        }
        if op.from.is_some() && op.shape != Shape::Disconnect {
            if op.duplicate {
                self.metrics.publish_duplicates += 1;
            } else {
                self.metrics.events_published += match &op.seqs {
                    Seqs::Many(seqs) => seqs.len() as u64,
                    _ => 1,
                };
            }
        }
        let reach = match (op.nodes, op.shape) {
            (Some(nodes), _) => Reach::Nodes(nodes),
            (None, Shape::Disconnect) => Reach::Disconnected(op.delivered),
            (None, _) => Reach::Connections {
                delivered: op.delivered,
                skipped: op.skipped,
            },
        };
        Outcome::Done(Published {
            seqs: std::mem::replace(&mut op.seqs, Seqs::None),
            reach,
            duplicate: op.duplicate,
        })
    }
}

impl Sink for Serving<'_> {
    fn publish(
        &mut self,
        target: &Target<'_>,
        data: &RawValue,
        idem: Option<&str>,
        ack: Option<AckAsk<'_>>,
    ) -> Outcome {
        self.fanout.execute(self.from, target, data, idem, ack)
    }

    fn disconnect_user(&mut self, user: &str) -> Outcome {
        self.fanout.disconnect(self.from, user)
    }

    fn presence(&mut self, channel: &str) -> Outcome {
        self.fanout.presence_query(self.from, channel)
    }

    fn has_capacity(&self) -> bool {
        self.fanout.pass.deliveries < DELIVERIES_PER_PASS && self.fanout.engine.has_capacity()
    }
}
