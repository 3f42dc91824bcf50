//! The channels a node watches: subscribing each on the shard that owns its slot (on first
//! interest, and again whenever that shard comes up or the map moves it), reading its stream
//! to fill what it missed, the joins that wait for such a read, and the periodic position
//! check.

use std::sync::Arc;

use bytes::Bytes;

use super::calls::{Call, Purpose, Read, Request};
use super::resp::{self, Frame};
use super::scripts::{Keys, Script};
use super::sequencer::{Sequencer, Step};
use super::shards::MapAnswer;
use super::{CHECKS_PER_TICK, RENEW, RedisEngine, Watched, millis, number};
use crate::base::channel::{Backfill, Since, user_channel};
use crate::base::ids::ConnId;
use crate::base::time::Tick;
use crate::engine::{AckTag, Entry, Happening, Joined, Replay};

impl RedisEngine {
    /// A new reason to watch `channel` (a first local subscriber, or a user's first connection
    /// for `user:<id>`): subscribes to it on first interest.
    pub(super) fn watch_shared(&mut self, channel: &str, now: Tick) {
        if let Some(watched) = self.channels.get_mut(channel) {
            watched.interest += 1;
            return;
        }
        let name: Arc<str> = channel.into();
        let watched = Watched {
            keys: Keys::of(&self.settings.prefix, channel),
            interest: 1,
            order: Sequencer::default(),
            queued: Vec::new(),
            subscribed_on: None,
        };
        self.channels.insert(Arc::clone(&name), watched);
        self.subscribe(&name, now);
    }

    /// One reason to watch `channel` is gone; the last unsubscribes.
    pub(super) fn unwatch_shared(&mut self, channel: &str, now: Tick) {
        let Some(watched) = self.channels.get_mut(channel) else {
            return;
        };
        watched.interest -= 1;
        if watched.interest > 0 {
            return;
        }
        let watched = self.channels.remove(channel).expect("watched");
        if let Some((_, link)) = self.shards.up_link(watched.keys.slot()) {
            send_subscription(link, "sunsubscribe", &watched.keys.shard_channel, now);
        }
    }

    /// `SSUBSCRIBE` to a watched channel on its shard, a read of what it missed, and the joins
    /// that waited; nothing while the shard is down (its heal does this).
    pub(super) fn subscribe(&mut self, name: &Arc<str>, now: Tick) {
        let Some((shard, link)) = self.shards.up_link(self.channels[name].keys.slot()) else {
            return;
        };
        let watched = self.channels.get_mut(name).expect("watched");
        send_subscription(link, "ssubscribe", &watched.keys.shard_channel, now);
        watched.subscribed_on = Some(shard);
        let sync = watched.order.resync();
        let queued = std::mem::take(&mut watched.queued);
        if sync.is_some() {
            self.send_read(shard, name, Read::Sync, now);
        }
        for (conn, backfill) in queued {
            self.send_read(shard, name, Read::Join(conn, backfill), now);
        }
    }

    /// A slot-map answer from shard `key`: a new map, and every up shard takes the channels
    /// it now owns (those it owned already resync, which costs a read and finds nothing); the
    /// same map, and the shards that came up since take theirs: whether a shard connected the
    /// first time, reconnected, was just promoted or is a new owner.
    pub(super) fn on_slots(&mut self, key: usize, frame: &Frame, now: Tick) {
        let answer = self.shards.on_slots(key, frame, now);
        self.take_map(answer, now);
    }

    /// A `ROLE` answer from shard `key`, under Sentinel: the primary takes its channels as a
    /// standalone Redis does; a replica (a primary demoted by a failover the Sentinels have
    /// not told us of yet) is left, and the Sentinels asked again.
    pub(super) fn on_role(&mut self, key: usize, frame: &Frame, now: Tick) {
        let role = resp::items(frame).and_then(|parts| parts.first().and_then(resp::text));
        if role == Some("master") {
            let answer = self.shards.standalone(key, now);
            return self.take_map(answer, now);
        }
        let addr = self.shards.get(key).map_or("", |s| s.addr.as_str());
        log::warn!(
            "redis {addr}: not the primary (ROLE {}): asking the Sentinels again",
            role.unwrap_or("?")
        );
        self.fail(key, "not the primary", now);
    }

    /// Every up shard takes the channels it owns under a new map; under the same map, the
    /// shards that came up since.
    fn take_map(&mut self, answer: MapAnswer, now: Tick) {
        let MapAnswer::Read { changed } = answer else {
            return;
        };
        for shard in self.shards.keys(|s| s.up && (changed || !s.subscribed)) {
            self.resubscribe(shard, now);
        }
    }

    /// Subscribes shard `key` to every watched channel it owns (and to the broadcasts and this
    /// node's mailbox if it owns their channels), reads what each missed, sends queued joins,
    /// takes leases again and puts this node's presence connections back.
    pub(super) fn resubscribe(&mut self, key: usize, now: Tick) {
        if let Some(shard) = self.shards.get_mut(key) {
            shard.subscribed = true;
        }
        let owned = |engine: &RedisEngine, slot: u16| engine.shards.up(slot) == Some(key);
        let names: Vec<Arc<str>> = self
            .channels
            .iter()
            .filter(|(_, w)| owned(self, w.keys.slot()))
            .map(|(name, _)| Arc::clone(name))
            .collect();
        for name in names {
            self.subscribe(&name, now);
        }
        for node_channel in self.node_channels().map(Keys::clone) {
            if owned(self, node_channel.slot()) {
                let link = self.shards.link(key);
                send_subscription(link, "ssubscribe", &node_channel.shard_channel, now);
            }
        }
        for (conn, user) in self.held_leases() {
            let slot = Keys::of(&self.settings.prefix, &user_channel(&user)).slot();
            if owned(self, slot) {
                self.send_lease(&user, conn, Bytes::from_static(RENEW), false, now);
            }
        }
        self.renew_presence(Some(key), now);
    }

    /// The shard channels every node subscribes to besides its watched channels: the
    /// broadcasts, and its mailbox.
    fn node_channels(&self) -> [&Keys; 2] {
        [&self.broadcast, &self.mailbox]
    }

    /// Shard `key`'s connection is gone: the channels subscribed on it are subscribed
    /// nowhere until it, or their slot's new owner, takes them again.
    pub(super) fn lost_subscriptions(&mut self, key: usize) {
        for watched in self.channels.values_mut() {
            if watched.subscribed_on == Some(key) {
                watched.subscribed_on = None;
            }
        }
    }

    /// Subscribes again, where the map says, to a channel whose subscription was lost to a
    /// slot move (a wrong guess is answered `MOVED`, which corrects the map and comes back
    /// here).
    pub(super) fn follow_subscription(&mut self, channel: &str, now: Tick) {
        let prefix = &self.settings.prefix;
        let node_channel = self
            .node_channels()
            .into_iter()
            .find(|keys| super::scripts::channel_of(prefix, &keys.shard_channel) == Some(channel));
        if let Some(keys) = node_channel {
            let keys = keys.clone();
            if let Some((_, link)) = self.shards.up_link(keys.slot()) {
                send_subscription(link, "ssubscribe", &keys.shard_channel, now);
            }
            return;
        }
        let Some(name) = self
            .channels
            .get_key_value(channel)
            .map(|(n, _)| Arc::clone(n))
        else {
            return;
        };
        let watched = self.channels.get_mut(channel).expect("watched");
        watched.order.abandon_sync();
        watched.subscribed_on = None;
        self.subscribe(&name, now);
    }

    /// A channel pages watch but nobody publishes to keeps its epoch: otherwise its next
    /// event would come in a new epoch, a gap that lost nothing.
    pub(super) fn keep_epochs(&mut self, now: Tick) {
        let ttl = self.settings.meta_ttl().as_millis().to_string();
        for watched in self.channels.values() {
            if let Some((_, link)) = self.shards.up_link(watched.keys.slot()) {
                let meta = watched.keys.meta();
                let args: [&[u8]; 3] = [b"PEXPIRE", meta.as_bytes(), ttl.as_bytes()];
                link.send(&args, Some(Request::Ignore), now);
            }
        }
    }

    /// The periodic position check: every `check_interval`, each watched channel whose
    /// subscription is up reads where it stands in Redis, at most [`CHECKS_PER_TICK`] per
    /// tick. What the read fills is counted as a repair (see `on_read`).
    pub(super) fn check_positions(&mut self, now: Tick) {
        if now >= self.due.check {
            self.due.check = now.after(self.periods.check);
            self.to_check = self.channels.keys().cloned().collect();
        }
        let start = self.to_check.len().saturating_sub(CHECKS_PER_TICK);
        for name in self.to_check.split_off(start) {
            let Some(watched) = self.channels.get_mut(&name) else {
                continue; // unwatched since
            };
            let up = |s: &usize| self.shards.get(*s).is_some_and(|s| s.up);
            let Some(shard) = watched.subscribed_on.filter(up) else {
                continue; // its resubscription reads anyway
            };
            if watched.order.position().is_some() && watched.order.resync().is_some() {
                self.send_read(shard, &name, Read::Check, now);
            }
        }
    }

    /// Where `channel` stands and what it missed since, atomically, on `shard`.
    pub(super) fn send_read(&mut self, shard: usize, name: &Arc<str>, read: Read, now: Tick) {
        let watched = &self.channels[name];
        // Who already delivered events reads a newer epoch from its start; the first read
        // of a channel, and a subscribe without `since`, only learn where it stands (and,
        // with `rewind`, the latest events).
        let (epoch, since, from_start, rewind) = match &read {
            Read::Join(_, Backfill { since, rewind }) => match since {
                Some(since) => (since.epoch.clone(), since.seq, true, *rewind),
                None => (String::new(), 0, false, *rewind),
            },
            Read::Sync | Read::Check => match watched.order.position() {
                Some((seq, epoch)) => (epoch.to_string(), seq, true, 0),
                None => (String::new(), 0, false, 0),
            },
        };
        let keys = &watched.keys;
        let script_keys = vec![keys.meta().into(), keys.stream().into()];
        let args = [
            Bytes::from(self.new_epoch()),
            millis(self.settings.meta_ttl()),
            epoch.into(),
            number(since),
            number(self.settings.history_size.max(1) as u64),
            Bytes::from_static(if from_start { b"1" } else { b"0" }),
            number(rewind.min(self.settings.history_size) as u64),
        ];
        let call = Call::script(Script::Read, script_keys, args);
        let channel = Arc::clone(name);
        self.shards
            .send_call(shard, call, Purpose::Read { channel, read }, now);
    }

    /// A read whose connection failed: a join waits for the heal, the channel's own read is
    /// asked again by its resubscription.
    pub(super) fn abandon_read(&mut self, channel: &str, read: Read) {
        if let Some(watched) = self.channels.get_mut(channel) {
            match read {
                Read::Join(conn, backfill) => watched.queued.push((conn, backfill)),
                Read::Sync | Read::Check => watched.order.abandon_sync(),
            }
        }
    }

    /// Where `channel` stands for `conn`, which joins it: answered now when this node knows
    /// where the channel stands and nothing needs reading, else when a read answers (after
    /// a reconnect if need be).
    pub(super) fn join_shared(
        &mut self,
        channel: &str,
        conn: ConnId,
        backfill: Backfill,
        now: Tick,
    ) {
        let Some((name, watched)) = self.channels.get_key_value(channel) else {
            debug_assert!(false, "a join on a channel not watched");
            return;
        };
        if let Some((seq, epoch)) = watched.order.position() {
            let recovered = match &backfill.since {
                None if backfill.rewind == 0 => Some(None),
                Some(s) if s.seq == seq && *s.epoch == **epoch => Some(Some(true)),
                _ => None, // to read: what it missed, or the latest events
            };
            if let Some(recovered) = recovered {
                let joined = Joined {
                    channel: Arc::clone(name),
                    conn,
                    seq,
                    epoch: Arc::clone(epoch),
                    recovered,
                    replay: Replay::Entries(Vec::new()),
                    floor: None,
                };
                self.out.push(Happening::Joined(joined));
                return;
            }
        }
        let name = Arc::clone(name);
        match self.shards.up(watched.keys.slot()) {
            Some(shard) => self.send_read(shard, &name, Read::Join(conn, backfill), now),
            None => {
                let watched = self.channels.get_mut(channel).expect("watched");
                watched.queued.push((conn, backfill));
            }
        }
    }

    /// A read's answer: the channel's own (deliver what it missed, read again while held
    /// events leave a hole), or a join's.
    pub(super) fn on_read(&mut self, channel: Arc<str>, read: Read, frame: &Frame, now: Tick) {
        let Some(ReadAnswer {
            epoch,
            seq,
            entries,
            rewound,
        }) = parse_read(frame)
        else {
            log::warn!("redis: unexpected read reply {frame:?}");
            return;
        };
        let Some(watched) = self.channels.get_mut(&channel) else {
            return; // unwatched meanwhile
        };
        let mut steps = std::mem::take(&mut self.steps);
        let Read::Join(conn, backfill) = read else {
            if let Some((last, known)) = watched.order.position()
                && **known == *epoch
                && seq < last
            {
                // Acknowledged writes lost (a failover before replication, an AOF without
                // fsync): the seqs after `seq` will be taken again by new events.
                log::warn!(
                    "redis: {channel} is at seq {seq} in Redis but this node delivered {last}: Redis lost acknowledged events"
                );
            }
            let next = watched.order.on_read(epoch, seq, entries, &mut steps);
            if matches!(read, Read::Check) && !steps.is_empty() {
                // The subscription should have brought these: a lost message, or a bug.
                self.repairs += steps.len() as u64;
                log::warn!(
                    "redis: the position check of {channel} found {} event(s) or gap(s) its subscription had not delivered; repaired",
                    steps.len()
                );
            }
            self.emit(&channel, &mut steps);
            self.steps = steps;
            if next.is_some()
                && let Some(shard) = self.shards.up(self.channels[&channel].keys.slot())
            {
                self.send_read(shard, &channel, Read::Sync, now);
            }
            return;
        };
        if watched.order.position().is_none() {
            // A join's read before the channel's own (after a reconnect): it places the
            // channel too.
            watched.order.on_read(epoch, seq, None, &mut steps);
            self.emit(&channel, &mut steps);
        }
        self.steps = steps;
        let at = (epoch, seq);
        let joined = if rewound {
            self.rewound(channel, conn, backfill.since.is_some(), at, entries)
        } else {
            self.joined(channel, conn, backfill.since, at, entries)
        };
        self.out.extend(joined.map(Happening::Joined));
    }

    /// A join's answer from its read: the channel was at `seq` of `epoch` in Redis, and this
    /// node's delivery stands where the happenings before this one brought it.
    fn joined(
        &self,
        channel: Arc<str>,
        conn: ConnId,
        since: Option<Since>,
        (epoch, seq): (&str, u64),
        entries: Option<Vec<Entry>>,
    ) -> Option<Joined> {
        let (delivered, local_epoch) = self.channels.get(&channel)?.order.position()?;
        // The entries resume it when they are every event after `since` up to the read's seq;
        // from an earlier epoch, every event of this one from seq 1 (it is told it lost what
        // it had not seen of its own, and gets the rest).
        let same_epoch = since.as_ref().is_some_and(|s| *s.epoch == *epoch);
        let replay = match (&since, entries) {
            (Some(since), Some(entries)) if **local_epoch == *epoch => {
                let from = if same_epoch { since.seq } else { 0 };
                let whole = from <= seq
                    && entries.len() as u64 == seq - from
                    && entries.first().is_none_or(|e| e.seq == from + 1);
                whole.then_some((from, entries))
            }
            _ => None,
        };
        let recovered = since.as_ref().map(|_| same_epoch && replay.is_some());
        let (told, replay, floor) = match replay {
            Some((from, mut entries)) => {
                entries.retain(|e| e.seq <= delivered);
                // A new epoch replayed from its start: the page is at its seq 0.
                let told = if same_epoch { delivered } else { from };
                // Ahead of this node: live once delivery passes what it has.
                (told, entries, (from > delivered).then_some(from))
            }
            None => (delivered, Vec::new(), None),
        };
        Some(Joined {
            channel,
            conn,
            seq: told,
            epoch: Arc::clone(local_epoch),
            recovered,
            replay: Replay::Entries(replay),
            floor,
        })
    }

    /// A join's answer from a read that gave the channel's latest events (`rewind`, with no
    /// `since` or one that could not be recovered): those this node has delivered, then live.
    fn rewound(
        &self,
        channel: Arc<str>,
        conn: ConnId,
        resumed: bool,
        (epoch, seq): (&str, u64),
        entries: Option<Vec<Entry>>,
    ) -> Option<Joined> {
        let (delivered, local_epoch) = self.channels.get(&channel)?.order.position()?;
        let mut entries = entries.unwrap_or_default();
        // The read ends at Redis's `seq`; this node delivers up to it in order, so the events
        // it has delivered, among the latest, are replayed, and the rest come live. A node
        // ahead of the read (it cannot be, the read and the events share one connection) or
        // in another epoch replays nothing rather than risk a gap.
        if **local_epoch != *epoch || delivered > seq {
            entries.clear();
        }
        entries.retain(|e| e.seq <= delivered);
        let told = entries.first().map_or(delivered, |e| e.seq - 1);
        Some(Joined {
            channel,
            conn,
            seq: told,
            epoch: Arc::clone(local_epoch),
            recovered: resumed.then_some(false),
            replay: Replay::Entries(entries),
            floor: None,
        })
    }

    /// The sequencer's steps for `channel`, as happenings.
    pub(super) fn emit(&mut self, channel: &Arc<str>, steps: &mut Vec<Step>) {
        for step in steps.drain(..) {
            self.out.push(match step {
                Step::Deliver(entry) => Happening::Deliver {
                    channel: Arc::clone(channel),
                    entry,
                    from: None,
                },
                Step::Gap { seq, epoch } => {
                    self.gaps += 1;
                    Happening::Gap {
                        channel: Arc::clone(channel),
                        seq,
                        epoch,
                    }
                }
            });
        }
    }
}

/// `SSUBSCRIBE` or `SUNSUBSCRIBE` (`kind`, lower case as its push names it) of one shard
/// channel.
pub(super) fn send_subscription(
    link: &mut super::link::Link<Request>,
    kind: &'static str,
    channel: &str,
    now: Tick,
) {
    let command = kind.to_ascii_uppercase();
    let args: [&[u8]; 2] = [command.as_bytes(), channel.as_bytes()];
    let tag = Request::Subscription(kind, channel.to_string());
    link.send(&args, Some(tag), now);
}

/// The READ script's answer.
struct ReadAnswer<'a> {
    epoch: &'a str,
    seq: u64,
    /// The entries, when they were read.
    entries: Option<Vec<Entry>>,
    /// They are the channel's latest (a rewind), not those after the caller's seq.
    rewound: bool,
}

/// The READ script's answer.
fn parse_read(frame: &Frame) -> Option<ReadAnswer<'_>> {
    use super::scripts::{field, tag};
    let parts = resp::items(frame)?;
    let epoch = resp::text(parts.first()?)?;
    let seq = resp::int(parts.get(1)?)? as u64;
    let Some(entries) = parts.get(2) else {
        return Some(ReadAnswer {
            epoch,
            seq,
            entries: None,
            rewound: false,
        });
    };
    let mut out = Vec::new();
    for entry in resp::items(entries)? {
        let fields = resp::items(entry)?;
        let id = resp::text(fields.first()?)?;
        let seq = id.split_once('-')?.0.parse().ok()?;
        let values = resp::items(fields.get(1)?)?;
        let (mut to_user, mut data, mut ack) = (false, None, None);
        for pair in values.chunks(2) {
            match (resp::text(&pair[0])?, pair.get(1)) {
                (field::KIND, Some(kind)) => {
                    to_user = resp::text(kind)?.as_bytes() == [tag::USER_EVENT];
                }
                (field::DATA, Some(value)) => data = Some(resp::bytes(value)?.clone()),
                (field::ACK, Some(value)) => ack = AckTag::decode(resp::text(value)?),
                _ => {}
            }
        }
        out.push(Entry {
            seq,
            to_user,
            data: data?,
            ack,
        });
    }
    let rewound = parts.get(3).and_then(resp::int) == Some(1);
    Some(ReadAnswer {
        epoch,
        seq,
        entries: Some(out),
        rewound,
    })
}
