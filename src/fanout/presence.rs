//! Presence as this node's pages see it: which channels have it (`presence_channels`), the
//! questions asked of the engine (snapshots, counts for a page or a worker), and each
//! channel's window: the changes gathered in it, sent as one `presence_diff` per page when it
//! closes, however many members joined and left in it, and the pages that joined in it, which
//! get one snapshot read once for all of them (instead of the diff: it holds the changes).
//!
//! The engine keeps the roster and decides joins and leaves (see
//! [`crate::engine::presence`]); every subscriber of a presence channel (a WebSocket: event
//! streams cannot be seen) is a member of it.
//!
//! Invariants: a window holds each member's latest change once, so a mass join of N members
//! costs every page one message per window, not N, and the engine one roster read per window,
//! not N; each question is answered once.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;
use slab::Slab;

use serde_json::value::RawValue;

use super::sessions::client_id;
use super::{Fanout, PublisherRef};
use crate::base::ids::ConnId;
use crate::base::time::Tick;
use crate::engine::Unavailable;
use crate::engine::presence::{Member, Members, Present};
use crate::publish::Outcome;
use crate::ws::wire::{self, ErrorCode, Rejection, Reply, RequestId};

/// Which channels have presence, and how their changes reach pages.
#[derive(Clone, Debug, Default)]
pub struct PresenceSettings {
    /// `presence_channels`: names, or prefixes ending in `*`.
    pub patterns: Vec<Box<str>>,
    /// `presence_window`, in ticks.
    pub window: u64,
    /// `max_presence_members`.
    pub max_members: usize,
}

/// Who asked the engine for a channel's members.
#[derive(Debug)]
pub(super) enum Ask {
    /// The pages that joined in one window: a snapshot each, the same.
    Snapshots(Vec<ConnId>),
    /// A page's `presence_stats`.
    Stats {
        /// The page.
        conn: ConnId,
        /// Its request's id.
        id: Option<RequestId>,
    },
    /// Every page of a channel whose changes may have been missed: a fresh snapshot each.
    Resync,
    /// A worker's `{"op":"presence"}`.
    Worker {
        /// The publisher.
        from: Option<PublisherRef>,
        /// The ticket its command was given.
        ticket: u64,
    },
}

/// One channel's window: the changes since it opened, each member's latest (joined, or
/// left), and the pages that joined meanwhile.
#[derive(Default)]
pub(super) struct Window {
    version: u64,
    changes: HashMap<Box<str>, Option<Member>>,
    joined: Vec<ConnId>,
}

/// A window that closed.
pub(super) struct Closed {
    pub channel: Arc<str>,
    /// Its `presence_diff`, when something changed.
    pub diff: Option<String>,
    /// The pages that joined in it, due a snapshot.
    pub joined: Vec<ConnId>,
}

/// This node's side of presence.
pub(super) struct Presence {
    settings: PresenceSettings,
    windows: HashMap<Arc<str>, Window>,
    /// Open windows, by when they close (all last as long, so in order).
    closing: VecDeque<(Tick, Arc<str>)>,
    asks: Slab<Ask>,
}

impl Presence {
    pub fn new(settings: PresenceSettings) -> Presence {
        Presence {
            settings,
            windows: HashMap::new(),
            closing: VecDeque::new(),
            asks: Slab::new(),
        }
    }

    /// Whether `channel` has presence.
    pub fn covers(&self, channel: &str) -> bool {
        !channel.starts_with(crate::base::channel::RESERVED_PREFIX)
            && self
                .settings
                .patterns
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => channel.starts_with(prefix),
                    None => **pattern == *channel,
                })
    }

    /// Keeps `ask` until its answer; returns the key the engine answers with.
    pub fn ask(&mut self, ask: Ask) -> usize {
        self.asks.insert(ask)
    }

    /// The question answered as `key`.
    pub fn answered(&mut self, key: usize) -> Option<Ask> {
        self.asks.try_remove(key)
    }

    /// Members of `channel` joined and left, as its change `version`: noted in its window,
    /// which opens now if it is not open.
    pub fn changed(
        &mut self,
        channel: Arc<str>,
        version: u64,
        joined: Vec<Member>,
        left: Vec<Box<str>>,
        now: Tick,
    ) {
        let window = self.window(channel, now);
        window.version = window.version.max(version);
        for member in joined {
            window.changes.insert(member.id.clone(), Some(member));
        }
        for id in left {
            window.changes.insert(id, None);
        }
    }

    /// Page `conn` joined `channel`: it gets a snapshot when the window closes.
    pub fn joined(&mut self, channel: Arc<str>, conn: ConnId, now: Tick) {
        self.window(channel, now).joined.push(conn);
    }

    /// `channel`'s window, opened now if it is not open.
    fn window(&mut self, channel: Arc<str>, now: Tick) -> &mut Window {
        match self.windows.entry(channel) {
            Entry::Occupied(open) => open.into_mut(),
            Entry::Vacant(new) => {
                let closes = now.after(self.settings.window);
                self.closing.push_back((closes, Arc::clone(new.key())));
                new.insert(Window::default())
            }
        }
    }

    /// When the next window closes.
    pub fn next_due(&self) -> Option<Tick> {
        self.closing.front().map(|(at, _)| *at)
    }

    /// The windows closed by `now`.
    pub fn closed(&mut self, now: Tick) -> Vec<Closed> {
        let mut closed = Vec::new();
        while let Some((at, _)) = self.closing.front()
            && *at <= now
        {
            let (_, channel) = self.closing.pop_front().expect("front");
            if let Some(window) = self.windows.remove(&channel) {
                let diff = (!window.changes.is_empty()).then(|| self.diff(&channel, &window));
                closed.push(Closed {
                    channel,
                    diff,
                    joined: window.joined,
                });
            }
        }
        closed
    }

    /// A page's snapshot of `members`.
    pub fn snapshot(&self, members: &Members) -> String {
        with_type("presence", &self.roll(members))
    }

    /// A worker's answer: `"channel"`, `"version"`, `"members"` and `"count"` as the fields
    /// of one JSON object.
    pub fn roll(&self, members: &Members) -> String {
        let listed = members.members.len() <= self.settings.max_members;
        let roll = Roll {
            channel: &members.channel,
            version: members.version,
            members: listed.then_some(&members.members[..]),
            truncated: !listed,
            count: Count {
                members: members.members.len(),
                connections: members.connections,
            },
        };
        serde_json::to_string(&roll).expect("a roll serializes")
    }

    fn diff(&self, channel: &str, window: &Window) -> String {
        let joins: Vec<&Member> = window.changes.values().flatten().collect();
        let leaves: Vec<&str> = (window.changes.iter())
            .filter(|(_, change)| change.is_none())
            .map(|(id, _)| &**id)
            .collect();
        let listed = joins.len() <= self.settings.max_members;
        let diff = Diff {
            channel,
            version: window.version,
            joins: if listed { joins } else { Vec::new() },
            leaves,
            truncated: !listed,
        };
        with_type(
            "presence_diff",
            &serde_json::to_string(&diff).expect("a diff serializes"),
        )
    }
}

/// `{"type":<kind>,` then the fields of `object`.
fn with_type(kind: &str, object: &str) -> String {
    format!("{{\"type\":\"{kind}\",{}", &object[1..])
}

#[derive(Serialize)]
struct Count {
    members: usize,
    connections: usize,
}

#[derive(Serialize)]
struct Roll<'a> {
    channel: &'a str,
    version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    members: Option<&'a [Member]>,
    #[serde(skip_serializing_if = "is_false")]
    truncated: bool,
    count: Count,
}

#[derive(Serialize)]
struct Diff<'a> {
    channel: &'a str,
    version: u64,
    joins: Vec<&'a Member>,
    leaves: Vec<&'a str>,
    #[serde(skip_serializing_if = "is_false")]
    truncated: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_false(b: &bool) -> bool {
    !b
}

impl Fanout {
    /// Connection `key`, of `user` when authenticated, just subscribed to presence channel
    /// `channel`: one more connection of its member.
    pub(super) fn enter_presence(&mut self, key: usize, channel: &str) {
        let conn = self.clients.live_mut(key);
        if conn.is_event_stream() {
            return;
        }
        let client = client_id(self.settings.instance, conn.id());
        let identity = conn
            .session()
            .and_then(|s| s.identity())
            .map(|(who, _)| who);
        let user = identity.map(|who| &*who.user);
        let info = identity
            .and_then(|who| who.presence.as_deref())
            .and_then(|text| serde_json::from_str::<&RawValue>(text).ok());
        let present = Present {
            member: user.unwrap_or(&client),
            client: &client,
            user,
            info,
        };
        self.engine.present(channel, &present, self.pass.now);
        drop(conn);
        self.apply();
    }

    /// Connection `id` of `user` (`None` without authentication) left presence channel
    /// `channel`, or closed.
    pub(super) fn leave_presence(&mut self, id: ConnId, user: Option<&str>, channel: &str) {
        let client = client_id(self.settings.instance, id);
        let member = user.unwrap_or(&client);
        self.engine.absent(channel, member, &client, self.pass.now);
        self.apply();
    }

    /// Asks the engine for `channel`'s members, for `ask`.
    pub(super) fn ask_members(&mut self, channel: &str, ask: Ask) {
        let key = self.presence.ask(ask);
        self.engine.members(channel, key, self.pass.now);
        self.apply();
    }

    /// The engine's answer to question `ask`: a page's snapshot or counts, every page's
    /// snapshot, or a worker's reply. When the engine could not read the roster, a page that
    /// asked is told `unavailable`, a worker too; a snapshot comes with the next resync.
    pub(super) fn on_members(&mut self, ask: usize, members: Result<&Members, Unavailable>) {
        let Some(ask) = self.presence.answered(ask) else {
            return;
        };
        let members = match (members, ask) {
            (Ok(members), ask) => (members, ask),
            (Err(Unavailable), Ask::Stats { conn, id }) => {
                if let Some(mut page) = self.clients.get_mut(conn.key as usize)
                    && page.id() == conn
                {
                    let message = "presence cannot be read now: try again";
                    page.send_reply(&Reply::from(&Rejection {
                        id,
                        ..Rejection::new(ErrorCode::Unavailable, message)
                    }));
                }
                return;
            }
            (Err(Unavailable), Ask::Worker { from, ticket }) => {
                self.complete(from, ticket, Outcome::Unavailable);
                return;
            }
            (Err(Unavailable), Ask::Snapshots(_) | Ask::Resync) => return,
        };
        match members {
            (members, Ask::Snapshots(pages)) => {
                let subscribed = self.hub.find(&members.channel);
                let frame = wire::text_frame(self.presence.snapshot(members).as_bytes());
                for conn in pages {
                    if let Some(mut page) = self.clients.get_mut(conn.key as usize)
                        && page.id() == conn
                        && subscribed.is_some_and(|c| page.is_subscribed(c))
                        && page.send_frame(frame.clone())
                    {
                        self.metrics.presence_messages += 1;
                    }
                }
            }
            (members, Ask::Resync) => {
                let snapshot = self.presence.snapshot(members);
                self.send_to_members(&members.channel, &snapshot, &[]);
            }
            (members, Ask::Stats { conn, id }) => {
                if let Some(mut page) = self.clients.get_mut(conn.key as usize)
                    && page.id() == conn
                {
                    page.send_reply(&Reply::PresenceStats {
                        channel: &members.channel,
                        members: members.members.len(),
                        connections: members.connections,
                        id: id.as_ref(),
                    });
                }
            }
            (members, Ask::Worker { from, ticket }) => {
                let outcome = Outcome::Members(self.presence.roll(members));
                self.complete(from, ticket, outcome);
            }
        }
    }

    /// A presence window of `channel` closed: its diff to the pages that were there, and
    /// one snapshot, read once, to those that joined in it.
    pub(super) fn close_window(&mut self, mut closed: Closed) {
        if let Some(diff) = &closed.diff {
            closed
                .joined
                .sort_unstable_by_key(|c| (c.key, c.generation));
            self.send_to_members(&closed.channel, diff, &closed.joined);
        }
        if !closed.joined.is_empty() {
            self.ask_members(&closed.channel, Ask::Snapshots(closed.joined));
        }
    }

    /// `message`, encoded once, to every live WebSocket subscriber of `channel` but those of
    /// `except`, sorted (their snapshot, which holds it, is on its way): a mass join's window
    /// is thousands of both, looked up in O(log n).
    pub(super) fn send_to_members(&mut self, channel: &str, message: &str, except: &[ConnId]) {
        let frame = wire::text_frame(message.as_bytes());
        let joins = self.joins.get(channel);
        let excepted = |id: &ConnId| {
            except
                .binary_search_by_key(&(id.key, id.generation), |c| (c.key, c.generation))
                .is_ok()
        };
        let mut sent = 0;
        for id in self.hub.subscribers(channel) {
            if joins.is_some_and(|joins| joins.iter().any(|j| j.conn == *id)) || excepted(id) {
                continue; // its snapshot, after its `subscribed`, is still to come
            }
            let mut conn = self.clients.live_mut(id.key as usize);
            if !conn.is_event_stream() && conn.send_frame(frame.clone()) {
                sent += 1;
            }
        }
        self.metrics.presence_messages += sent;
    }

    /// A worker's `{"op":"presence","channel":...}`: the members, now or once the engine
    /// answers.
    pub(super) fn presence_query(&mut self, from: Option<PublisherRef>, channel: &str) -> Outcome {
        if !self.presence.covers(channel) {
            return Outcome::Refused {
                error: format!("{channel} has no presence (see presence_channels)"),
                retry: false,
            };
        }
        let ticket = self.ops.next_ticket();
        self.ask_members(channel, Ask::Worker { from, ticket });
        self.take_completion(ticket)
            .unwrap_or(Outcome::Waiting(ticket))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member {
            id: id.into(),
            user: Some(id.into()),
            clients: vec![format!("c-{id}").into()],
            info: None,
        }
    }

    fn presence(max_members: usize) -> Presence {
        Presence::new(PresenceSettings {
            patterns: vec!["doc:*".into(), "room".into()],
            window: 10,
            max_members,
        })
    }

    #[test]
    fn which_channels_have_presence() {
        let presence = presence(10);
        for (channel, covered) in [
            ("doc:1", true),
            ("doc:", true),
            ("room", true),
            ("rooms", false),
            ("docs", false),
            ("sidecast:stats", false),
        ] {
            assert_eq!(presence.covers(channel), covered, "{channel}");
        }
    }

    #[test]
    fn a_window_sends_each_members_latest_change_once() {
        let mut presence = presence(10);
        let channel: Arc<str> = "doc:1".into();
        presence.changed(Arc::clone(&channel), 1, vec![member("u1")], vec![], Tick(0));
        presence.changed(Arc::clone(&channel), 2, vec![member("u2")], vec![], Tick(5));
        presence.changed(Arc::clone(&channel), 3, vec![], vec!["u1".into()], Tick(6));
        presence.changed(Arc::clone(&channel), 4, vec![member("u3")], vec![], Tick(7));
        let page = ConnId {
            key: 1,
            generation: 1,
        };
        presence.joined(Arc::clone(&channel), page, Tick(8));
        assert_eq!(presence.next_due(), Some(Tick(10)));
        assert!(presence.closed(Tick(9)).is_empty());
        let closed = presence.closed(Tick(10));
        assert_eq!(closed.len(), 1, "one message for the window");
        assert_eq!(
            closed[0].joined,
            [page],
            "and one snapshot for who joined in it"
        );
        let diff = closed[0].diff.as_deref().expect("a diff");
        let diff: serde_json::Value = serde_json::from_str(diff).unwrap();
        assert_eq!(diff["type"], "presence_diff");
        assert_eq!(diff["version"], 4);
        let mut joins: Vec<_> = (diff["joins"].as_array().unwrap().iter())
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        joins.sort();
        assert_eq!(joins, ["u2", "u3"]);
        assert_eq!(diff["leaves"], serde_json::json!(["u1"]));
        assert_eq!(presence.next_due(), None);
    }

    #[test]
    fn past_the_cap_pages_get_counts_only() {
        let presence = presence(1);
        let members = Members {
            channel: "doc:1".into(),
            version: 7,
            members: vec![member("u1"), member("u2")],
            connections: 3,
        };
        let snapshot: serde_json::Value =
            serde_json::from_str(&presence.snapshot(&members)).unwrap();
        assert_eq!(
            snapshot,
            serde_json::json!({"type": "presence", "channel": "doc:1", "version": 7, "truncated": true, "count": {"members": 2, "connections": 3}})
        );
    }
}
