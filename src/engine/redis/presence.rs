//! Presence through Redis: every node's connections on a presence channel in one roster per
//! channel (keys in [`scripts`](super::scripts)), with a lease per connection that its node
//! renews; joins and leaves decided atomically by the scripts, each announced once on the
//! channel's shard channel with the next presence version.
//!
//! - A connection enters with `PRESENCE_ENTER`: its member joins if the roster did not have
//!   it; a lingering member is back, silently.
//! - It leaves with `PRESENCE_LEAVE`: the member's last one gone, the member lingers.
//! - Every node runs `PRESENCE_REAP` on its presence channels a few times per linger: expired
//!   leases (a node that died) end their connections; members whose linger ended leave. A
//!   leave is announced by whichever node reaps it first, once.
//! - Leases are renewed every `user_lease_ttl / 3`. After a shard comes back (a Redis that
//!   restarted, maybe empty) the node puts its connections back silently, then its pages get
//!   a fresh snapshot: no storm of leaves and joins, and no member left over.
//!
//! Invariants: a call that fails changes nothing that the next renewal or reap does not
//! mend; this node's pages hear of every change through the one subscription of the channel.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::calls::{Call, Purpose};
use super::resp::{self, Frame};
use super::scripts::{Keys, Script};
use super::{RedisEngine, millis};
use crate::base::time::Tick;
use crate::engine::presence::{Member, Members, Present};
use crate::engine::{Happening, Unavailable};

/// One of this node's connections on a presence channel.
pub(super) struct Here {
    member: Box<str>,
    client: Box<str>,
    /// The member's card, as the roster keeps it.
    card: Box<str>,
    /// Its entry was sent (and its join, if any, announced): after a shard comes back it is
    /// put back silently; one never sent enters as it would have.
    sent: bool,
}

/// What the roster keeps of a member besides its id.
#[derive(Serialize, Deserialize)]
struct Card<'a> {
    #[serde(borrow, skip_serializing_if = "Option::is_none")]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, skip_serializing_if = "Option::is_none")]
    info: Option<&'a RawValue>,
}

/// A change announced on a channel's shard channel.
#[derive(Deserialize)]
struct Change<'a> {
    v: u64,
    #[serde(borrow)]
    id: Cow<'a, str>,
    /// A join's first client.
    #[serde(borrow)]
    c: Option<Cow<'a, str>>,
    /// A join's card.
    #[serde(borrow)]
    m: Option<Cow<'a, str>>,
}

impl RedisEngine {
    /// Enters `present` in `channel`'s roster, and remembers it for renewals.
    pub(super) fn present_shared(&mut self, channel: &str, present: &Present<'_>, now: Tick) {
        let card = Card {
            user: present.user.map(Cow::Borrowed),
            info: present.info,
        };
        let here = Here {
            member: present.member.into(),
            client: present.client.into(),
            card: serde_json::to_string(&card)
                .expect("a card serializes")
                .into(),
            sent: false,
        };
        let mut here = [here];
        self.send_enter(channel, &mut here, false, now);
        let [here] = here;
        let name = match self.channels.get_key_value(channel) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(channel),
        };
        self.presence.entry(name).or_default().push(here);
    }

    /// Takes connection `client` of `member` out of `channel`'s roster.
    pub(super) fn absent_shared(&mut self, channel: &str, member: &str, client: &str, now: Tick) {
        if let Some(here) = self.presence.get_mut(channel) {
            here.retain(|h| *h.client != *client);
            if here.is_empty() {
                self.presence.remove(channel);
                self.versions.remove(channel);
            }
        }
        let keys = Keys::of(&self.settings.prefix, channel);
        let Some(shard) = self.shards.up(keys.slot()) else {
            return; // its lease expires, and a reap ends it
        };
        let [roster, conns, counts, leaving, ..] = keys.presence();
        let args = [
            Bytes::copy_from_slice(member.as_bytes()),
            Bytes::copy_from_slice(client.as_bytes()),
            millis(self.settings.presence_linger),
        ];
        let keys = [roster, conns, counts, leaving].map(Bytes::from).to_vec();
        let call = Call::script(Script::PresenceLeave, keys, args);
        self.shards.send_call(shard, call, Purpose::Presence, now);
    }

    /// Reads `channel`'s roster for `ask`.
    pub(super) fn members_shared(&mut self, channel: &str, ask: usize, now: Tick) {
        let keys = Keys::of(&self.settings.prefix, channel);
        let Some(shard) = self.shards.up(keys.slot()) else {
            let members = Err(Unavailable);
            self.out.push(Happening::Members { ask, members });
            return;
        };
        let [roster, conns, _, _, version, _] = keys.presence();
        let keys = [roster, conns, version].map(Bytes::from).to_vec();
        let call = Call::script(Script::PresenceRead, keys, []);
        let channel = Arc::from(channel);
        self.shards
            .send_call(shard, call, Purpose::Members { channel, ask }, now);
    }

    /// Renews the leases of this node's connections on every presence channel; `shard`: puts
    /// back those of the channels it owns, which just came back (see
    /// [`PRESENCE_ENTER`](super::scripts::PRESENCE_ENTER)).
    pub(super) fn renew_presence(&mut self, shard: Option<usize>, now: Tick) {
        let restore = shard.is_some();
        let channels: Vec<Arc<str>> = self.presence.keys().cloned().collect();
        for channel in channels {
            let slot = Keys::of(&self.settings.prefix, &channel).slot();
            if shard.is_some_and(|key| self.shards.up(slot) != Some(key)) {
                continue;
            }
            let mut here = self.presence.remove(&channel).unwrap_or_default();
            let (mut put_back, mut first): (Vec<Here>, Vec<Here>) =
                here.drain(..).partition(|h| h.sent);
            self.send_enter(&channel, &mut put_back, restore, now);
            self.send_enter(&channel, &mut first, false, now);
            put_back.append(&mut first);
            self.presence.insert(channel, put_back);
        }
    }

    /// Ends what is due in the rosters of this node's presence channels.
    pub(super) fn reap_presence(&mut self, now: Tick) {
        let channels: Vec<Arc<str>> = self.presence.keys().cloned().collect();
        for channel in channels {
            let keys = Keys::of(&self.settings.prefix, &channel);
            let Some(shard) = self.shards.up(keys.slot()) else {
                continue;
            };
            let args = [
                Bytes::from(keys.shard_channel.clone()),
                millis(self.settings.presence_linger),
            ];
            let [roster, conns, counts, leaving, version, _] = keys.presence();
            let keys = [roster, conns, counts, leaving, version]
                .map(Bytes::from)
                .to_vec();
            let call = Call::script(Script::PresenceReap, keys, args);
            self.shards.send_call(shard, call, Purpose::Presence, now);
        }
    }

    /// The answer to a restoring `PRESENCE_ENTER` on `channel`: when Redis had kept the
    /// roster, this node's pages may have missed changes, and get a fresh snapshot now; when
    /// it had lost it, every node is putting its connections back, and they get one once a
    /// lease has passed (members that left meanwhile are gone from it then).
    pub(super) fn on_restored(&mut self, channel: Arc<str>, frame: &Frame, now: Tick) {
        if resp::int(frame) == Some(1) {
            log::warn!("redis: the presence of {channel} was lost; its nodes put it back");
            let due = now.after(self.periods.renew * 3);
            self.stale_presence.push((due, channel));
        } else {
            self.out.push(Happening::PresenceStale(channel));
        }
    }

    /// Channels whose pages are due a fresh snapshot by `now`.
    pub(super) fn resync_presence(&mut self, now: Tick) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.stale_presence)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.stale_presence = later;
        for (_, channel) in due {
            if self.presence.contains_key(&channel) {
                self.out.push(Happening::PresenceStale(channel));
            }
        }
    }

    /// A change announced on `channel`: a join (with its card) or a leave.
    pub(super) fn on_presence_change(&mut self, channel: &Arc<str>, payload: &[u8]) {
        let Ok(change) = serde_json::from_slice::<Change<'_>>(payload) else {
            log::warn!("redis: a malformed presence change on {channel}");
            return;
        };
        self.saw_version(channel, change.v);
        let (joined, left) = match (change.m, change.c) {
            (Some(card), Some(client)) => {
                let member = member(&change.id, &card, vec![client.into()]);
                (vec![member], Vec::new())
            }
            _ => (Vec::new(), vec![change.id.into()]),
        };
        self.out.push(Happening::PresenceChanged {
            channel: Arc::clone(channel),
            version: change.v,
            joined,
            left,
        });
    }

    /// The roster read for `ask`.
    pub(super) fn on_members(&mut self, channel: Arc<str>, ask: usize, frame: &Frame) {
        let members = parse_roster(channel, frame).ok_or(Unavailable);
        match &members {
            Ok(members) => self.saw_version(&members.channel, members.version),
            Err(Unavailable) => log::warn!("redis: unexpected presence read {frame:?}"),
        }
        self.out.push(Happening::Members { ask, members });
    }

    /// The highest presence version of `channel` this node saw.
    fn saw_version(&mut self, channel: &Arc<str>, version: u64) {
        let seen = self.versions.entry(Arc::clone(channel)).or_default();
        *seen = (*seen).max(version);
    }

    /// `PRESENCE_ENTER` of `here` on `channel` (`restore`: putting them back after the shard
    /// came back), if its shard is up (otherwise the renewal after it comes back puts them
    /// in).
    fn send_enter(&mut self, channel: &str, here: &mut [Here], restore: bool, now: Tick) {
        if here.is_empty() {
            return;
        }
        let keys = Keys::of(&self.settings.prefix, channel);
        let Some(shard) = self.shards.up(keys.slot()) else {
            return;
        };
        let ttl = self.settings.lease_ttl.max(self.settings.presence_linger) * 3;
        let seen = self.versions.get(channel).copied().unwrap_or_default();
        let mut args = vec![
            Bytes::from(keys.shard_channel.clone()),
            millis(self.settings.lease_ttl),
            millis(ttl),
            Bytes::from_static(if restore { b"1" } else { b"0" }),
            Bytes::from(seen.to_string()),
        ];
        for h in here {
            h.sent = true;
            args.push(Bytes::copy_from_slice(h.member.as_bytes()));
            args.push(Bytes::copy_from_slice(h.client.as_bytes()));
            args.push(Bytes::copy_from_slice(h.card.as_bytes()));
        }
        let keys = keys.presence().map(Bytes::from).to_vec();
        let call = Call::script(Script::PresenceEnter, keys, args);
        let purpose = match restore {
            true => Purpose::Restore {
                channel: Arc::from(channel),
            },
            false => Purpose::Presence,
        };
        self.shards.send_call(shard, call, purpose, now);
    }
}

/// A member from its id, its card and its clients.
fn member(id: &str, card: &str, clients: Vec<Box<str>>) -> Member {
    let card: Option<Card<'_>> = serde_json::from_str(card).ok();
    Member {
        id: id.into(),
        user: card
            .as_ref()
            .and_then(|c| c.user.as_deref())
            .map(Into::into),
        clients,
        info: card.and_then(|c| c.info).map(ToOwned::to_owned),
    }
}

/// `PRESENCE_READ`'s answer: the version, the roster's cards, the connections.
fn parse_roster(channel: Arc<str>, frame: &Frame) -> Option<Members> {
    let parts = resp::items(frame)?;
    let version = resp::int(parts.first()?)? as u64;
    let cards = resp::items(parts.get(1)?)?;
    let conns = resp::items(parts.get(2)?)?;
    let mut clients: HashMap<&str, Vec<Box<str>>> = HashMap::new();
    for conn in conns {
        let (member, client) = resp::text(conn)?.rsplit_once('\n')?;
        clients.entry(member).or_default().push(client.into());
    }
    let connections = conns.len();
    let mut members = Vec::with_capacity(cards.len() / 2);
    for pair in cards.chunks(2) {
        let id = resp::text(&pair[0])?;
        let card = resp::text(pair.get(1)?)?;
        members.push(member(id, card, clients.remove(id).unwrap_or_default()));
    }
    Some(Members {
        channel,
        version,
        members,
        connections,
    })
}
