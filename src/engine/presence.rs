//! Presence: who is on a channel, per member (a user, or without authentication a connection),
//! with the client ids of its connections and its public `info`. The engine keeps the roster
//! (one node's in memory, every node's in Redis) and decides joins and leaves; the fan-out
//! coalesces them for its pages.
//!
//! A member joins with its first connection and leaves `presence_linger` after its last one
//! closed, unless one came back meanwhile: then nothing is said at all, so a reload or a
//! rolling restart is silent. Every change takes the channel's next presence version; a
//! roster read says which version it is at, so a page applies only the changes after it.
//!
//! [`Roster`] is the in-memory keeper (the memory engine's); invariants: a member is listed
//! exactly while it has a connection or lingers; each join and each leave is announced once.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use super::Happening;
use crate::base::time::Tick;
use crate::reactor::timer::{TimerKey, TimerWheel};

/// A member of a presence channel, as pages see it.
#[derive(Clone, Debug, Serialize)]
pub struct Member {
    /// Its id: the user (`sub`), or without authentication its connection's client id.
    pub id: Box<str>,
    /// The user, when authenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<Box<str>>,
    /// The client ids of its connections.
    pub clients: Vec<Box<str>>,
    /// Public information from its token's `presence` claim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<Box<RawValue>>,
}

/// One connection of a member arriving on a presence channel.
#[derive(Clone, Copy, Debug)]
pub struct Present<'a> {
    /// The member's id.
    pub member: &'a str,
    /// The connection's client id.
    pub client: &'a str,
    /// The user, when authenticated.
    pub user: Option<&'a str>,
    /// The member's public information.
    pub info: Option<&'a RawValue>,
}

/// A channel's presence as read at one version.
#[derive(Debug)]
pub struct Members {
    /// The channel.
    pub channel: Arc<str>,
    /// The version the roster is at: changes after it are those with a greater one.
    pub version: u64,
    /// The members (lingering ones included: they have not left).
    pub members: Vec<Member>,
    /// Their open connections.
    pub connections: usize,
}

/// One member's entry.
struct Entry {
    user: Option<Box<str>>,
    info: Option<Box<RawValue>>,
    clients: Vec<Box<str>>,
    /// Its last connection closed: it leaves when this timer fires.
    leaving: Option<TimerKey>,
}

impl Entry {
    fn member(&self, id: &str) -> Member {
        Member {
            id: id.into(),
            user: self.user.clone(),
            clients: self.clients.clone(),
            info: self.info.clone(),
        }
    }
}

/// One channel's members.
struct Channel {
    /// Its name, shared with the map's key.
    name: Arc<str>,
    version: u64,
    members: HashMap<Box<str>, Entry>,
    connections: usize,
}

/// Every presence channel of one node, in memory.
pub struct Roster {
    linger: u64,
    channels: HashMap<Arc<str>, Channel>,
    leaving: TimerWheel<(Arc<str>, Box<str>)>,
    expired: Vec<(Arc<str>, Box<str>)>,
}

impl Roster {
    /// An empty roster whose members linger `linger` ticks after their last connection.
    pub fn new(linger: u64) -> Roster {
        Roster {
            linger,
            channels: HashMap::new(),
            leaving: TimerWheel::new(Tick(0)),
            expired: Vec::new(),
        }
    }

    /// A connection of `present.member` is on `channel`: a join if the member was not there.
    pub fn present(&mut self, channel: &str, present: &Present<'_>, out: &mut Vec<Happening>) {
        let name = match self.channels.get_key_value(channel) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(channel),
        };
        let roster = (self.channels.entry(Arc::clone(&name))).or_insert_with(|| Channel {
            name: Arc::clone(&name),
            version: 0,
            members: HashMap::new(),
            connections: 0,
        });
        if let Some(entry) = roster.members.get_mut(present.member) {
            if let Some(timer) = entry.leaving.take() {
                self.leaving.cancel(timer); // back within the linger: nothing to say
            }
            if !entry.clients.iter().any(|c| **c == *present.client) {
                entry.clients.push(present.client.into());
                roster.connections += 1;
            }
            return;
        }
        let entry = Entry {
            user: present.user.map(Into::into),
            info: present.info.map(ToOwned::to_owned),
            clients: vec![present.client.into()],
            leaving: None,
        };
        let member = entry.member(present.member);
        roster.members.insert(present.member.into(), entry);
        roster.connections += 1;
        roster.version += 1;
        out.push(Happening::PresenceChanged {
            channel: name,
            version: roster.version,
            joined: vec![member],
            left: Vec::new(),
        });
    }

    /// Connection `client` of `member` left `channel`: with its last one gone, the member
    /// leaves once it has lingered.
    pub fn absent(
        &mut self,
        channel: &str,
        member: &str,
        client: &str,
        now: Tick,
        out: &mut Vec<Happening>,
    ) {
        let Some(roster) = self.channels.get_mut(channel) else {
            return;
        };
        let Some(entry) = roster.members.get_mut(member) else {
            return;
        };
        let Some(at) = entry.clients.iter().position(|c| **c == *client) else {
            return;
        };
        entry.clients.swap_remove(at);
        roster.connections -= 1;
        if entry.clients.is_empty() {
            let key = (Arc::clone(&roster.name), Box::from(member));
            if self.linger == 0 {
                self.leave(&key, out);
            } else {
                entry.leaving = Some(self.leaving.insert(now.after(self.linger), key));
            }
        }
    }

    /// The members of `channel`, now.
    pub fn members(&self, channel: &str) -> Members {
        let Some(roster) = self.channels.get(channel) else {
            return Members {
                channel: channel.into(),
                version: 0,
                members: Vec::new(),
                connections: 0,
            };
        };
        Members {
            channel: Arc::clone(&roster.name),
            version: roster.version,
            members: (roster.members.iter())
                .map(|(id, entry)| entry.member(id))
                .collect(),
            connections: roster.connections,
        }
    }

    /// Members whose linger ended by `now` leave.
    pub fn expire(&mut self, now: Tick, out: &mut Vec<Happening>) {
        let mut expired = std::mem::take(&mut self.expired);
        self.leaving.advance(now, &mut expired);
        for key in expired.drain(..) {
            self.leave(&key, out);
        }
        self.expired = expired;
    }

    /// When the next linger ends.
    pub fn next_due(&self) -> Option<Tick> {
        self.leaving.next_deadline()
    }

    fn leave(&mut self, (channel, member): &(Arc<str>, Box<str>), out: &mut Vec<Happening>) {
        let Some(roster) = self.channels.get_mut(channel) else {
            return;
        };
        roster.members.remove(member);
        roster.version += 1;
        out.push(Happening::PresenceChanged {
            channel: Arc::clone(channel),
            version: roster.version,
            joined: Vec::new(),
            left: vec![member.clone()],
        });
        if roster.members.is_empty() {
            self.channels.remove(channel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn present<'a>(member: &'a str, client: &'a str) -> Present<'a> {
        Present {
            member,
            client,
            user: Some(member),
            info: None,
        }
    }

    fn changes(out: &mut Vec<Happening>) -> Vec<(u64, Vec<String>, Vec<String>)> {
        out.drain(..)
            .map(|h| match h {
                Happening::PresenceChanged {
                    version,
                    joined,
                    left,
                    ..
                } => (
                    version,
                    joined.iter().map(|m| m.id.to_string()).collect(),
                    left.iter().map(ToString::to_string).collect(),
                ),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_member_is_one_user_however_many_tabs_and_lingers_silently() {
        let mut roster = Roster::new(100);
        let mut out = Vec::new();
        roster.present("doc:1", &present("u1", "c1"), &mut out);
        roster.present("doc:1", &present("u1", "c2"), &mut out);
        roster.present("doc:1", &present("u2", "c3"), &mut out);
        assert_eq!(
            changes(&mut out),
            [
                (1, vec!["u1".into()], vec![]),
                (2, vec!["u2".into()], vec![])
            ]
        );
        let members = roster.members("doc:1");
        assert_eq!((members.version, members.connections), (2, 3));
        roster.absent("doc:1", "u1", "c1", Tick(0), &mut out);
        roster.absent("doc:1", "u1", "c2", Tick(0), &mut out);
        roster.present("doc:1", &present("u1", "c4"), &mut out);
        roster.expire(Tick(1000), &mut out);
        assert!(
            out.is_empty(),
            "back within the linger: {:?}",
            changes(&mut out)
        );
        roster.absent("doc:1", "u1", "c4", Tick(1000), &mut out);
        roster.expire(Tick(1099), &mut out);
        assert!(out.is_empty());
        assert_eq!(roster.members("doc:1").members.len(), 2, "u1 lingers");
        roster.expire(Tick(1100), &mut out);
        assert_eq!(changes(&mut out), [(3, vec![], vec!["u1".into()])]);
        roster.absent("doc:1", "u2", "c3", Tick(1100), &mut out);
        roster.expire(Tick(1200), &mut out);
        assert_eq!(changes(&mut out), [(4, vec![], vec!["u2".into()])]);
        assert!(roster.channels.is_empty(), "an empty channel is forgotten");
    }
}
