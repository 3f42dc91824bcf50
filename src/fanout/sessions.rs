//! WebSocket sessions as the fan-out serves them: opening one (token, per-user limit,
//! `connected`), carrying out its verdicts (subscribe, unsubscribe, refresh), and ending it.
//!
//! A subscribe has one path whichever the engine: the connection enters the hub and is
//! listed in `joins` (deliveries skip it meanwhile), the engine is asked to [`join`], and its
//! [`Joined`] answer (within the call for the memory engine, after a read of the stream for
//! Redis) sends `subscribed`, then what was missed, and makes the connection live: at once,
//! or, when it saw on another node events this one has not delivered yet, with the first
//! event past that *floor*.
//!
//! [`join`]: crate::engine::Engine::join

use std::collections::HashMap;
use std::sync::Arc;

use super::presence::Ask;
use super::{Auth, Fanout, SessionSettings, deliver, hub};
use crate::base::channel::Backfill;
use crate::base::ids::ConnId;
use crate::base::time::Tick;
use crate::engine::{Joined, Replay};
use crate::error::Close;
use crate::ws::deflate::EventFrame;
use crate::ws::session::{Inbound, Rules, Verdict};
use crate::ws::wire::{
    self, ErrorCode, EventTarget, Rejection, Reply, Request, RequestId, Subscribing,
};

/// A connection waiting to be live on a channel.
#[derive(Debug)]
pub(super) struct Join {
    pub conn: ConnId,
    id: Option<RequestId>,
    /// `None` while its join is unanswered; then the last seq it has (it goes live past it).
    floor: Option<u64>,
}

impl Fanout {
    /// Opens the session of a connection just upgraded: checks its token (with
    /// authentication on), indexes its user and sends `connected` (once the engine admits it
    /// everywhere, when it asks other nodes). Returns when its token expires, if it has one.
    ///
    /// # Errors
    /// The close verdict for a refused token or a user at `max_connections_per_user`.
    pub fn open(&mut self, key: usize, token: Option<&str>) -> Result<Option<Tick>, Close> {
        self.metrics.connections += 1;
        self.metrics.connections_opened += 1;
        let mut conn = self.clients.live_mut(key);
        self.metrics.event_streams += u64::from(conn.is_event_stream());
        let id = conn.id();
        let mut expires = None;
        if let Some(auth) = &self.auth {
            let users = &self.users;
            let identity = auth
                .admit(token, |user| users.connections(user).len())
                .map_err(|refused| {
                    log::debug!(
                        "conn={} from {}: {}",
                        id.generation,
                        conn.peer(),
                        refused.detail
                    );
                    refused.close
                })?;
            let first = self.users.add(&identity.user, id);
            let tick = auth.expiry_tick(&identity, self.pass.now, self.pass.unix_secs());
            expires = Some(tick);
            let (max, now) = (auth.max_per_user(), self.pass.now);
            let waits = self.engine.admit(&identity.user, id, max, first, now);
            let session = conn.session_mut().expect("an open session");
            session.set_identity(identity, tick);
            drop(conn);
            self.apply();
            if waits {
                return Ok(expires); // `connected` once the engine admits it everywhere
            }
        } else {
            drop(conn);
        }
        self.send_connected(key);
        Ok(expires)
    }

    /// Sends `connected` to a session just admitted.
    pub(super) fn send_connected(&mut self, key: usize) {
        let mut conn = self.clients.live_mut(key);
        let id = conn.id();
        let settings = &self.settings;
        let client_id = client_id(settings.instance, id);
        let session = conn.session().expect("an open session");
        let user_id = session
            .identity()
            .map(|(identity, _)| identity.user.clone());
        let heartbeat_ms = if conn.is_event_stream() {
            settings.sse_heartbeat_ms
        } else {
            settings.heartbeat_ms
        };
        conn.send_reply(&Reply::Connected {
            client_id: &client_id,
            heartbeat_ms,
            rate_limit: settings.rate_limit,
            rate_burst: settings.rate_burst,
            user_id: user_id.as_deref(),
        });
    }

    /// Judges one client message and carries out the verdict. Returns a close verdict for
    /// the reactor to act on.
    pub fn on_message(&mut self, key: usize, message: Inbound) -> Option<Close> {
        let now = self.pass.now;
        let mut conn = self.clients.get_mut(key)?;
        if !conn.is_open() {
            return None;
        }
        let rules = rules(&self.settings, self.auth.as_ref());
        let session = conn.session_mut()?;
        let verdict = session.on_message(message, &rules, &self.hub, now);
        drop(conn);
        self.carry_out(key, verdict)
    }

    /// Subscribes an event stream just opened to the channels of its request, as one batch
    /// `subscribe` (judged and charged alike). Returns a close verdict for the reactor.
    pub fn subscribe_stream(
        &mut self,
        key: usize,
        entries: Vec<Result<Subscribing, Rejection>>,
    ) -> Option<Close> {
        let now = self.pass.now;
        let rules = rules(&self.settings, self.auth.as_ref());
        let mut conn = self.clients.live_mut(key);
        let request = Request::SubscribeMany { entries, id: None };
        let verdict = conn
            .session_mut()?
            .on_request(request, &rules, &self.hub, now);
        drop(conn);
        self.carry_out(key, verdict)
    }

    /// Carries out a session's verdict on connection `key`, open.
    fn carry_out(&mut self, key: usize, verdict: Verdict) -> Option<Close> {
        let now = self.pass.now;
        let mut conn = self.clients.live_mut(key);
        let conn_id = conn.id();
        match verdict {
            Verdict::Nothing => {}
            Verdict::Close(close) => return Some(close),
            Verdict::Reject(rejection) => conn.send_reply(&Reply::from(&rejection)),
            Verdict::Pong { id } => conn.send_reply(&Reply::Pong { id: id.as_ref() }),
            Verdict::Many(verdicts) => {
                drop(conn);
                for verdict in verdicts {
                    if let Some(close) = self.carry_out(key, verdict) {
                        return Some(close);
                    }
                }
            }
            Verdict::Subscribe {
                channel,
                backfill,
                id,
            } => {
                let (channel_id, joined) = self.hub.subscribe(&channel, conn_id);
                conn.session_mut()?.add_subscription(channel_id);
                drop(conn);
                if joined == hub::Joined::First {
                    self.engine.watch(channel.as_str(), now);
                }
                if self.presence.covers(channel.as_str()) {
                    self.enter_presence(key, channel.as_str());
                }
                self.join(self.hub.name(channel_id), conn_id, backfill, id);
            }
            Verdict::Unsubscribe { channel, id } => {
                let (mut last, mut left) = (None, false);
                if let Some(channel_id) = self.hub.find(channel.as_str())
                    && conn.session_mut()?.remove_subscription(channel_id)
                {
                    last = self.hub.unsubscribe(channel_id, conn_id);
                    left = true;
                }
                conn.send_reply(&Reply::Unsubscribed {
                    channel: channel.as_str(),
                    id: id.as_ref(),
                });
                // A member of a presence channel leaves it: the user is read before the
                // connection is let go.
                let member =
                    left && !conn.is_event_stream() && self.presence.covers(channel.as_str());
                let user = member.then(|| {
                    let session = conn.session().and_then(|s| s.identity());
                    session.map(|(who, _)| who.user.clone())
                });
                drop(conn);
                self.forget_join(channel.as_str(), conn_id);
                if let Some(user) = user {
                    self.leave_presence(conn_id, user.as_deref(), channel.as_str());
                }
                if let Some(name) = last {
                    self.engine.unwatch(&name, now);
                    self.apply();
                }
            }
            Verdict::Ack { channel, seqs } => {
                let subscribed = self
                    .hub
                    .find(channel.as_str())
                    .is_some_and(|c| conn.is_subscribed(c));
                let session = conn.session_mut()?;
                for seq in seqs {
                    let Some(key) = self.tallies.find(channel.as_str(), seq) else {
                        continue; // unknown, late or already counted: ignored
                    };
                    if session.take_ack(key) {
                        self.tallies.acked(key);
                    } else if subscribed {
                        let user = session.identity().map(|(who, _)| &*who.user);
                        self.tallies.resumed(key, conn_id, user);
                    }
                }
                drop(conn);
                self.post_mail();
            }
            Verdict::PresenceStats { channel, id } => {
                if !self.presence.covers(channel.as_str()) {
                    let message = "this channel has no presence (see presence_channels)";
                    let refused =
                        Rejection::on_channel(ErrorCode::NoPresence, message, &channel, id);
                    conn.send_reply(&Reply::from(&refused));
                } else {
                    drop(conn);
                    let ask = Ask::Stats { conn: conn_id, id };
                    self.ask_members(channel.as_str(), ask);
                }
            }
            Verdict::Refresh { identity, id } => {
                let auth = self.auth.as_ref()?;
                let expires_at = identity.expires_at;
                let tick = auth.expiry_tick(&identity, now, self.pass.unix_secs());
                conn.session_mut()?.set_identity(identity, tick);
                conn.send_reply(&Reply::Refreshed {
                    expires_at,
                    id: id.as_ref(),
                });
            }
        }
        None
    }

    /// `conn`, just in the hub for `channel`, joins it: listed as joining, then the engine's
    /// answer (carried out at once when it answers within the call).
    fn join(&mut self, channel: Arc<str>, conn: ConnId, backfill: Backfill, id: Option<RequestId>) {
        let joins = self.joins.entry(Arc::clone(&channel)).or_default();
        joins.retain(|j| j.conn != conn);
        joins.push(Join {
            conn,
            id,
            floor: None,
        });
        self.engine.join(&channel, conn, backfill, self.pass.now);
        self.apply();
    }

    /// A join's answer: `subscribed`, what it missed, and live from there (or from its floor).
    pub(super) fn on_joined(&mut self, joined: Joined) {
        let Joined {
            channel,
            conn: conn_id,
            seq,
            epoch,
            recovered,
            replay,
            floor,
        } = joined;
        let Some(joins) = self.joins.get_mut(&channel) else {
            return;
        };
        let Some(index) = joins
            .iter()
            .position(|j| j.conn == conn_id && j.floor.is_none())
        else {
            return; // left, or closed, meanwhile
        };
        let id = joins[index].id.take();
        let mut conn = self.clients.live_mut(conn_id.key as usize);
        conn.send_reply(&Reply::Subscribed {
            channel: &channel,
            seq,
            epoch: &epoch,
            recovered,
            id: id.as_ref(),
        });
        let started_us = self.pass.started_us;
        let arena = &mut self.arena;
        let replayed = match replay {
            Replay::Frames { first, frames } => {
                for (seq, frame) in (first..).zip(frames) {
                    let frame = &mut EventFrame::plain_only(frame);
                    deliver(&mut conn, frame, Some((&channel, seq)), started_us, arena);
                }
                Vec::new()
            }
            Replay::Entries(entries) => {
                for entry in &entries {
                    let target = match &entry.ack {
                        Some(_) => EventTarget::Acked(&channel, entry.seq),
                        None => EventTarget::Channel(&channel, entry.seq),
                    };
                    let frame = wire::event_frame(target, &entry.data, &mut self.scratch);
                    let at = Some((&*channel, entry.seq));
                    deliver(
                        &mut conn,
                        &mut EventFrame::plain_only(frame),
                        at,
                        started_us,
                        arena,
                    );
                }
                entries
            }
        };
        let stream = conn.is_event_stream();
        drop(conn);
        for entry in &replayed {
            if let Some(tag) = &entry.ack {
                self.follow_replayed(&channel, entry.seq, tag);
            }
        }
        if !stream && self.presence.covers(&channel) {
            self.presence
                .joined(Arc::clone(&channel), conn_id, self.pass.now);
        }
        let joins = self.joins.get_mut(&channel).expect("listed");
        match floor {
            Some(floor) => joins[index].floor = Some(floor),
            None => {
                joins.swap_remove(index);
                if joins.is_empty() {
                    self.joins.remove(&channel);
                }
            }
        }
    }

    /// `conn` left `channel` (or closed): it is no longer joining it.
    fn forget_join(&mut self, channel: &str, conn: ConnId) {
        if let Some(joins) = self.joins.get_mut(channel) {
            joins.retain(|j| j.conn != conn);
            if joins.is_empty() {
                self.joins.remove(channel);
            }
        }
    }

    /// Ends a connection's session for `close` (the first reason given sticks), queuing the
    /// Close frame: leaves every channel, forgets its user, updates the gauge and counts the
    /// disconnect, once.
    pub fn end(&mut self, key: usize, close: Close) {
        let Some(mut conn) = self.clients.get_mut(key) else {
            return;
        };
        let Some(ended) = conn.end(close) else {
            return;
        };
        let id = conn.id();
        let reason = conn.close_reason().unwrap_or(close);
        drop(conn);
        let now = self.pass.now;
        for channel in ended.subscriptions {
            let name = self.hub.name(channel);
            self.forget_join(&name, id);
            if !ended.event_stream && self.presence.covers(&name) {
                self.leave_presence(id, ended.user.as_deref(), &name);
            }
            if let Some(name) = self.hub.unsubscribe(channel, id) {
                self.engine.unwatch(&name, now);
            }
        }
        for key in ended.awaiting {
            self.tallies.gone(key, ended.user.as_deref());
        }
        if let Some(user) = ended.user {
            let last = self.users.remove(&user, id);
            self.engine.release(&user, id, last, now);
        }
        self.apply();
        self.metrics.connections -= 1;
        self.metrics.event_streams -= u64::from(ended.event_stream);
        self.metrics.disconnected(reason);
        log::debug!("conn={} closed: {}", id.generation, reason.label());
    }
}

/// The client id connection `id` of process `instance` is told in `connected`, and known by
/// in presence.
pub(super) fn client_id(instance: u32, id: ConnId) -> String {
    format!("{instance:08x}{:08x}", id.generation)
}

/// What a session's requests are judged by.
fn rules<'a>(settings: &SessionSettings, auth: Option<&'a Auth>) -> Rules<'a> {
    Rules {
        rate: settings.rate,
        rate_limit: settings.rate_limit,
        rate_burst: settings.rate_burst,
        strikes: settings.rate_limit_strikes,
        max_subscriptions: settings.max_subscriptions,
        verifier: auth.map(Auth::verifier),
    }
}

/// The connections an event `seq` of `channel` must skip: those still joining it. Joiners
/// whose floor this event passes are live from it on.
pub(super) fn joiners_before<'a>(
    joins: &'a mut HashMap<Arc<str>, Vec<Join>>,
    channel: &str,
    seq: u64,
) -> Option<&'a [Join]> {
    if joins.is_empty() {
        return None;
    }
    let waiting = joins.get_mut(channel)?;
    waiting.retain(|j| j.floor.is_none_or(|floor| seq <= floor));
    if waiting.is_empty() {
        joins.remove(channel);
        return None;
    }
    joins.get(channel).map(Vec::as_slice)
}
