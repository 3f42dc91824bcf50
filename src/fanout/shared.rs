//! The fan-out over a shared engine (Redis): publishes that are answered later, events that
//! arrive from Redis in its one order, and joins (subscribes and resumes) that wait for a
//! read of the channel's stream.
//!
//! A joining connection is in the hub at once (so its session, unsubscribe and close work as
//! ever) but listed in `joins` until its read answers: deliveries skip it meanwhile, and its
//! read's entries go out first. The read is one atomic step in Redis, answered on the same
//! connection that carries the channel's events, so everything published before it is in its
//! entries and everything after arrives behind it: no gap and no duplicate at the seam. A
//! joiner ahead of this node (it saw, on another node, events this one has not delivered yet)
//! waits with a *floor* and goes live with the first event past it.
//!
//! Invariants: a connection is listed in `joins[channel]` at most once, only while it is in
//! the hub for that channel; every publish in `ops` is completed exactly once, when its last
//! part is answered; a publish is answered `ok` only when Redis stored every part.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::value::RawValue;

use super::{Fanout, deliver};
use crate::base::channel::{Since, user_channel, user_of};
use crate::base::ids::ConnId;
use crate::engine::redis::sequencer::Entry;
use crate::engine::redis::{Happening, RedisEngine, Stored, Unavailable};
use crate::error::Close;
use crate::publish::{Outcome, Published, Reach, Seqs, Target};
use crate::ws::wire::{self, EventTarget, Reply, RequestId};

/// A connection waiting to be live on a channel.
#[derive(Debug)]
pub(super) struct Join {
    conn: ConnId,
    id: Option<RequestId>,
    /// `None` while its read is in flight; then the last seq it has (it goes live past it).
    floor: Option<u64>,
}

/// A publish in flight: one part per channel.
struct Op {
    publisher: (usize, u64),
    ticket: u64,
    shape: Shape,
    results: Vec<Option<Result<Stored, Unavailable>>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    One,
    Many,
    /// A broadcast or a disconnect: no seq.
    Seqless,
}

/// A publisher's answered command, for the reactor to hand to that publisher.
#[derive(Debug)]
pub struct Completion {
    /// The publisher's key and serial (a stale key is told apart by its serial).
    pub publisher: (usize, u64),
    /// The ticket its command was given.
    pub ticket: u64,
    /// The answer.
    pub outcome: Outcome,
}

/// The fan-out's state for a shared engine.
pub(super) struct Shared {
    pub(super) engine: Box<RedisEngine>,
    ops: slab::Slab<Op>,
    next_ticket: u64,
    /// The publisher whose commands are being executed.
    serving: (usize, u64),
    completions: Vec<Completion>,
    joins: HashMap<Arc<str>, Vec<Join>>,
}

impl Shared {
    pub(super) fn new(engine: Box<RedisEngine>) -> Shared {
        Shared {
            engine,
            ops: slab::Slab::new(),
            next_ticket: 0,
            serving: (usize::MAX, 0),
            completions: Vec::new(),
            joins: HashMap::new(),
        }
    }
}

impl Fanout {
    fn shared(&mut self) -> &mut Shared {
        self.shared.as_mut().expect("the shared engine")
    }

    /// The shared engine, when the node runs one.
    pub fn redis(&mut self) -> Option<&mut RedisEngine> {
        self.shared.as_mut().map(|s| &mut *s.engine)
    }

    /// The state of the shared engine, for `/health` and `/metrics`.
    pub fn redis_state(&self) -> Option<crate::engine::redis::RedisState> {
        self.shared.as_ref().map(|s| s.engine.state())
    }

    /// The publisher whose lines run next (its answers are routed back to it).
    pub fn serve(&mut self, key: usize, serial: u64) {
        if let Some(shared) = &mut self.shared {
            shared.serving = (key, serial);
        }
    }

    /// Publishes answered since the last call.
    pub fn take_completions(&mut self) -> Vec<Completion> {
        self.shared
            .as_mut()
            .map(|s| std::mem::take(&mut s.completions))
            .unwrap_or_default()
    }

    /// A publish through the shared engine: sent now, answered later.
    pub(super) fn publish_shared(
        &mut self,
        target: &Target<'_>,
        data: &RawValue,
        idem: Option<&str>,
    ) -> Outcome {
        let (channels, shape, to_user): (Vec<String>, Shape, bool) = match target {
            Target::Channel(c) => (vec![c.to_string()], Shape::One, false),
            Target::Channels(cs) => (
                cs.iter().map(|c| c.to_string()).collect(),
                Shape::Many,
                false,
            ),
            Target::User(u) => (vec![user_channel(u)], Shape::One, true),
            Target::Broadcast => (Vec::new(), Shape::Seqless, false),
        };
        let parts = channels.len().max(1);
        let op = self.start_op(shape, parts);
        let shared = self.shared();
        let mut failed = 0;
        if shape == Shape::Seqless {
            failed += usize::from(shared.engine.broadcast(op, data.get().as_bytes()).is_err());
        }
        for (part, channel) in channels.iter().enumerate() {
            let sent =
                shared
                    .engine
                    .publish(op, part, channel, to_user, data.get().as_bytes(), idem);
            if sent.is_err() {
                shared.ops[op].results[part] = Some(Err(Unavailable));
                failed += 1;
            }
        }
        self.settle(op, failed == parts)
    }

    /// A `disconnect` through the shared engine: every node closes the user's connections.
    pub(super) fn disconnect_shared(&mut self, user: &str) -> Outcome {
        let op = self.start_op(Shape::Seqless, 1);
        let failed = self.shared().engine.disconnect_user(op, user).is_err();
        self.settle(op, failed)
    }

    fn start_op(&mut self, shape: Shape, parts: usize) -> usize {
        let shared = self.shared();
        shared.next_ticket += 1;
        let op = Op {
            publisher: shared.serving,
            ticket: shared.next_ticket,
            shape,
            results: vec![None; parts],
        };
        shared.ops.insert(op)
    }

    /// What the publisher is told now: unavailable when no part could even be sent.
    fn settle(&mut self, op: usize, all_failed: bool) -> Outcome {
        let shared = self.shared();
        if all_failed {
            shared.ops.remove(op);
            self.metrics.publish_unavailable += 1;
            return Outcome::Unavailable;
        }
        Outcome::Waiting(shared.ops[op].ticket)
    }

    /// Carries out what the shared engine read from Redis this pass.
    pub fn apply_happenings(&mut self) {
        let Some(shared) = &mut self.shared else {
            return;
        };
        let mut happenings = shared.engine.take_happenings();
        for happening in happenings.drain(..) {
            match happening {
                Happening::Deliver { channel, entry } => self.deliver_shared(&channel, &entry),
                Happening::Gap {
                    channel,
                    seq,
                    epoch,
                } => self.report_gap(&channel, seq, &epoch),
                Happening::Joined {
                    channel,
                    conn,
                    since,
                    epoch,
                    seq,
                    entries,
                    delivered,
                } => self.on_joined(&channel, conn, since, (&epoch, seq), entries, delivered),
                Happening::Done { op, part, result } => self.on_done(op, part, result),
                Happening::Broadcast(data) => {
                    self.broadcast_local(&data);
                }
                Happening::Disconnect(user) => {
                    self.close_user(&user);
                }
                Happening::LeaseGranted(conn) => {
                    if self.clients.is_current(conn) {
                        self.send_connected(conn.key as usize);
                    }
                }
                Happening::LeaseRefused(conn) => {
                    if self.clients.is_current(conn) {
                        log::debug!("conn={}: user at max_connections_per_user", conn.generation);
                        self.end(conn.key as usize, Close::UserLimit);
                        self.closed_by_command.push(conn);
                    }
                }
            }
        }
        if let Some(shared) = &mut self.shared {
            shared.engine.recycle(happenings);
        }
    }

    fn on_done(&mut self, op: usize, part: usize, result: Result<Stored, Unavailable>) {
        let shared = self.shared();
        let Some(entry) = shared.ops.get_mut(op) else {
            return;
        };
        entry.results[part] = Some(result);
        if entry.results.iter().any(Option::is_none) {
            return;
        }
        let op = shared.ops.remove(op);
        let results: Option<Vec<Stored>> = op.results.into_iter().map(|r| r?.ok()).collect();
        let outcome = match results {
            None => {
                self.metrics.publish_unavailable += 1;
                Outcome::Unavailable
            }
            Some(stored) => {
                let duplicate = stored.iter().all(|s| s.duplicate);
                if duplicate {
                    self.metrics.publish_duplicates += 1;
                } else {
                    self.metrics.events_published += stored.len() as u64;
                }
                Outcome::Done(Published {
                    seqs: match op.shape {
                        Shape::One => Seqs::One(stored[0].seq),
                        Shape::Many => Seqs::Many(stored.iter().map(|s| s.seq).collect()),
                        Shape::Seqless => Seqs::None,
                    },
                    reach: Reach::Nodes(stored.iter().map(|s| s.nodes).sum()),
                    duplicate,
                })
            }
        };
        self.shared().completions.push(Completion {
            publisher: op.publisher,
            ticket: op.ticket,
            outcome,
        });
    }

    /// An event of `channel` in Redis's order: to every live local subscriber and, for a
    /// user publish, to the user's connections not subscribed.
    fn deliver_shared(&mut self, channel: &Arc<str>, entry: &Entry) {
        let shared = self.shared.as_mut().expect("the shared engine");
        let joins = match shared.joins.get_mut(channel) {
            Some(joins) => {
                // Joiners whose floor this event passes are live from this event on.
                joins.retain(|j| j.floor.is_none_or(|floor| entry.seq <= floor));
                if joins.is_empty() {
                    shared.joins.remove(channel);
                    None
                } else {
                    shared.joins.get(channel)
                }
            }
            None => None,
        };
        let frame = wire::event_frame(
            EventTarget::Channel(channel, entry.seq),
            &entry.data,
            &mut self.scratch,
        );
        let started_us = self.pass.started_us;
        let mut delivered = 0;
        let subscribers = self.hub.subscribers(channel);
        for id in subscribers {
            if joins.is_some_and(|joins| joins.iter().any(|j| j.conn == *id)) {
                continue;
            }
            let mut conn = self.clients.live_mut(id.key as usize);
            delivered += usize::from(deliver(&mut conn, &frame, started_us));
        }
        if entry.to_user
            && let Some(user) = user_of(channel)
        {
            let channel_id = self.hub.find(channel);
            for id in self.users.connections(user) {
                let mut conn = self.clients.live_mut(id.key as usize);
                if !channel_id.is_some_and(|c| conn.is_subscribed(c)) {
                    delivered += usize::from(deliver(&mut conn, &frame, started_us));
                }
            }
        }
        self.pass.deliveries += delivered.max(1);
        self.metrics.frames_delivered += delivered as u64;
    }

    /// Tells the live subscribers of `channel` that events up to `seq` are lost.
    fn report_gap(&mut self, channel: &str, seq: u64, epoch: &str) {
        let joins = self.shared.as_ref().and_then(|s| s.joins.get(channel));
        let gap = Reply::Gap {
            channel,
            seq,
            epoch,
        };
        for id in self.hub.subscribers(channel) {
            if joins.is_some_and(|joins| joins.iter().any(|j| j.conn == *id)) {
                continue;
            }
            self.clients.live_mut(id.key as usize).send_reply(&gap);
        }
        self.metrics.gaps_reported += 1;
    }

    /// A subscribe through the shared engine: answered now when this node knows where the
    /// channel stands and nothing needs reading, else when the read answers.
    pub(super) fn join_shared(
        &mut self,
        key: usize,
        channel: &str,
        since: Option<Since>,
        id: Option<RequestId>,
    ) {
        let shared = self.shared.as_mut().expect("the shared engine");
        let Some(mut conn) = self.clients.get_mut(key) else {
            return;
        };
        let conn_id = conn.id();
        if let Some((seq, epoch)) = shared.engine.position(channel) {
            let recovered = match &since {
                None => Some(None),
                Some(s) if s.seq == seq && *s.epoch == **epoch => Some(Some(true)),
                Some(_) => None,
            };
            if let Some(recovered) = recovered {
                conn.send_reply(&Reply::Subscribed {
                    channel,
                    seq,
                    epoch,
                    recovered,
                    id: id.as_ref(),
                });
                return;
            }
        }
        let joins = shared.joins.entry(channel.into()).or_default();
        joins.retain(|j| j.conn != conn_id);
        joins.push(Join {
            conn: conn_id,
            id,
            floor: None,
        });
        shared.engine.join(channel, conn_id, since);
    }

    /// A join's read answered: the channel was at `seq` of `epoch` in Redis and at
    /// `delivered` on this node. `subscribed`, what it missed, and live from there.
    fn on_joined(
        &mut self,
        channel: &Arc<str>,
        conn_id: ConnId,
        since: Option<Since>,
        (epoch, seq): (&str, u64),
        entries: Option<Vec<Entry>>,
        (delivered, local_epoch): (u64, Arc<str>),
    ) {
        let shared = self.shared.as_mut().expect("the shared engine");
        let Some(joins) = shared.joins.get_mut(channel) else {
            return;
        };
        let Some(index) = joins
            .iter()
            .position(|j| j.conn == conn_id && j.floor.is_none())
        else {
            return; // left, or closed, meanwhile
        };
        // The entries resume it when they are every event after `since` up to the read's seq;
        // from an earlier epoch, every event of this one from seq 1 (it is told it lost what
        // it had not seen of its own, and gets the rest).
        let same_epoch = since.as_ref().is_some_and(|s| *s.epoch == *epoch);
        let replay = match (&since, entries) {
            (Some(since), Some(entries)) if *local_epoch == *epoch => {
                let from = if same_epoch { since.seq } else { 0 };
                let whole = from <= seq
                    && entries.len() as u64 == seq - from
                    && entries.first().is_none_or(|e| e.seq == from + 1);
                whole.then_some((from, entries))
            }
            _ => None,
        };
        let recovered = since.as_ref().map(|_| same_epoch && replay.is_some());
        let id = joins[index].id.take();
        let mut conn = self.clients.live_mut(conn_id.key as usize);
        conn.send_reply(&Reply::Subscribed {
            channel,
            // A new epoch replayed from its start: the page is at its seq 0.
            seq: if recovered == Some(false) && replay.is_some() {
                0
            } else {
                delivered
            },
            epoch: &local_epoch,
            recovered,
            id: id.as_ref(),
        });
        let mut floor = None;
        if let Some((since_seq, entries)) = replay {
            let started_us = self.pass.started_us;
            for entry in entries.iter().filter(|e| e.seq <= delivered) {
                let frame = wire::event_frame(
                    EventTarget::Channel(channel, entry.seq),
                    &entry.data,
                    &mut self.scratch,
                );
                deliver(&mut conn, &frame, started_us);
            }
            // Ahead of this node: live once delivery passes what it has.
            floor = (since_seq > delivered).then_some(since_seq);
        }
        drop(conn);
        let shared = self.shared.as_mut().expect("the shared engine");
        let joins = shared.joins.get_mut(channel).expect("listed");
        match floor {
            Some(floor) => joins[index].floor = Some(floor),
            None => {
                joins.swap_remove(index);
                if joins.is_empty() {
                    shared.joins.remove(channel);
                }
            }
        }
    }

    /// `conn` left `channel` (or closed): it is no longer joining it.
    pub(super) fn forget_join(&mut self, channel: &str, conn: ConnId) {
        if let Some(shared) = &mut self.shared
            && let Some(joins) = shared.joins.get_mut(channel)
        {
            joins.retain(|j| j.conn != conn);
            if joins.is_empty() {
                shared.joins.remove(channel);
            }
        }
    }

    /// A broadcast's frame to every open connection of this node.
    pub(super) fn broadcast_local(&mut self, data: &[u8]) -> usize {
        let frame = wire::event_frame(EventTarget::Broadcast, data, &mut self.scratch);
        let started_us = self.pass.started_us;
        let mut delivered = 0;
        self.clients
            .for_each(|conn| delivered += usize::from(deliver(conn, &frame, started_us)));
        self.metrics.frames_delivered += delivered as u64;
        self.pass.deliveries += delivered.max(1);
        delivered
    }
}
