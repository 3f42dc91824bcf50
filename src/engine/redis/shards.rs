//! The Redis engine's connections: one shard per master, found from the seeds and the slot
//! map, connected with backoff, and on each (re)connect subscribed to every watched channel it
//! owns, with a read of what each missed. Also how calls are written (`EVALSHA`, `EVAL`
//! after `NOSCRIPT`, `ASKING` after `ASK`) and what becomes of the requests of a connection
//! that fails.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::cluster::SlotMap;
use super::link::Link;
use super::resp::{self, Frame};
use super::scripts::{Keys, Script};
use super::{
    BROADCAST_CHANNEL, CHECKS_PER_TICK, Call, Happening, MAP_RETRY, MAX_BACKOFF, MIN_BACKOFF,
    Purpose, RENEW, Read, RedisEngine, Request, Shard, Unavailable, millis, number,
    send_subscription,
};
use crate::base::channel::user_channel;
use crate::config::RedisUrl;
use crate::reactor::token::{self, Source};

impl RedisEngine {
    pub(super) fn shard_for_addr(&mut self, addr: &str) -> usize {
        if let Some(&key) = self.by_addr.get(addr) {
            return key;
        }
        let key = self.shards.insert(Shard {
            addr: addr.to_string(),
            link: None,
            up: false,
            subscribed: false,
            backoff: MIN_BACKOFF,
            retry_at: None,
        });
        self.by_addr.insert(addr.to_string(), key);
        key
    }

    /// The shard that owns `slot`, when its connection is up.
    pub(super) fn up_shard(&self, slot: u16) -> Option<usize> {
        let owner = self.map.as_ref()?.owner(slot);
        let key = *self.by_addr.get(owner)?;
        self.shards[key].up.then_some(key)
    }

    /// The URL (and so the credentials) to use for `addr`: a seed's own, or the first seed's
    /// for a node the cluster named.
    pub(super) fn url_for(&self, addr: &str) -> &RedisUrl {
        let urls = &self.settings.urls;
        urls.iter()
            .find(|u| u.host_port == addr)
            .unwrap_or(&urls[0])
    }

    pub(super) fn connect(&mut self, key: usize, now: Instant) {
        let addr = self.shards[key].addr.clone();
        let token = token::encode(Source::Redis(key));
        match Link::connect(&addr, &self.registry, token) {
            Ok(mut link) => {
                let url = self.url_for(&addr);
                let name = format!("sidecast-{}", self.settings.node_id);
                let mut hello: Vec<&[u8]> = vec![b"HELLO", b"3"];
                if let (Some(user), Some(password)) = (&url.user, &url.password) {
                    hello.extend([b"AUTH".as_slice(), user.as_bytes(), password.as_bytes()]);
                }
                hello.extend([b"SETNAME".as_slice(), name.as_bytes()]);
                link.send(&hello, Some(Request::Hello), now);
                for script in [Script::Publish, Script::Read, Script::Lease] {
                    let args: [&[u8]; 3] = [b"SCRIPT", b"LOAD", script.source().as_bytes()];
                    link.send(&args, Some(Request::Load(script)), now);
                }
                self.shards[key].link = Some(link);
                self.shards[key].retry_at = None;
            }
            Err(e) => {
                log::warn!("redis {addr}: cannot connect: {e}");
                self.schedule_retry(key, now);
            }
        }
    }

    pub(super) fn schedule_retry(&mut self, key: usize, now: Instant) {
        let shard = &mut self.shards[key];
        // Full jitter over the upper half, so nodes that lost Redis together spread out.
        let jitter = self.epoch_seed.hash_one(now) % 1000;
        let wait = shard.backoff / 2 + shard.backoff.mul_f64(jitter as f64 / 2000.0);
        shard.retry_at = Some(now + wait);
        shard.backoff = (shard.backoff * 2).min(MAX_BACKOFF);
        if self.map.is_none() {
            // No map yet: try the next seed.
            self.next_seed = (self.next_seed + 1) % self.settings.urls.len();
            let seed = self.settings.urls[self.next_seed].host_port.clone();
            if seed != self.shards[key].addr {
                self.by_addr.remove(&self.shards[key].addr);
                self.by_addr.insert(seed.clone(), key);
                self.shards[key].addr = seed;
            }
        }
    }

    /// Shard `key`'s connection failed: every request on it is answered as failed or kept
    /// for the heal, and it reconnects after a backoff.
    pub(super) fn fail(&mut self, key: usize, why: &str) {
        let Some(link) = self.shards[key].link.take() else {
            return;
        };
        let was_up = std::mem::replace(&mut self.shards[key].up, false);
        self.lost_subscriptions(key);
        if was_up {
            self.disconnects += 1;
            log::warn!("redis {}: connection lost: {why}", link.addr);
        } else {
            // Retries of a connection that never came up: one line per attempt at debug.
            log::debug!("redis {}: cannot connect: {why}", link.addr);
        }
        for request in link.close(&self.registry).collect::<Vec<_>>() {
            if let Request::Call(_, purpose) = request {
                self.abandon(purpose);
            }
        }
        self.schedule_retry(key, Instant::now());
        if self.map.as_ref().is_some_and(SlotMap::is_cluster) {
            // A failover may have moved its slots: read the map again from another node.
            self.refresh_map();
        }
    }

    /// A request whose connection failed before it was answered.
    pub(super) fn abandon(&mut self, purpose: Purpose) {
        match purpose {
            Purpose::Publish { op, part, bytes } => {
                self.end_flight(bytes);
                self.out.push(Happening::Done {
                    op,
                    part,
                    result: Err(Unavailable),
                });
            }
            Purpose::Signal { op, bytes } => {
                self.end_flight(bytes);
                self.out.push(Happening::Done {
                    op,
                    part: 0,
                    result: Err(Unavailable),
                });
            }
            Purpose::Read { channel, read } => {
                if let Some(watched) = self.channels.get_mut(&channel) {
                    match read {
                        Read::Join(conn, since) => watched.queued.push((conn, since)),
                        Read::Sync | Read::Check => watched.order.abandon_sync(),
                    }
                }
            }
            // Admitted on this node's count; the lease is taken again on heal.
            Purpose::Lease { conn, fresh } => {
                if fresh && self.leases.contains_key(&conn) {
                    self.out.push(Happening::LeaseGranted(conn));
                }
            }
        }
    }

    /// A `MOVED`: `slot` lives on `addr` now; connects to it if it is new.
    pub(super) fn moved(&mut self, slot: u16, addr: &str) {
        if let Some(map) = &mut self.map {
            map.moved(slot, addr);
        }
        let target = self.shard_for_addr(addr);
        if self.shards[target].link.is_none() && self.shards[target].retry_at.is_none() {
            self.connect(target, Instant::now());
        }
    }

    /// Subscribes again, where the map says, to a channel whose subscription was lost to a
    /// slot move (a wrong guess is answered `MOVED`, which corrects the map and comes back
    /// here).
    pub(super) fn follow_subscription(&mut self, channel: &str) {
        if channel == BROADCAST_CHANNEL {
            if let Some(shard) = self.up_shard(self.broadcast.slot()) {
                let link = self.shards[shard].link.as_mut().expect("up");
                send_subscription(link, "ssubscribe", &self.broadcast.shard_channel);
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
        if let Some(watched) = self.channels.get_mut(channel) {
            watched.order.abandon_sync();
            watched.subscribed_on = None;
        }
        self.subscribe(&name);
    }

    pub(super) fn refresh_map(&mut self) {
        if let Some((_, shard)) = self.shards.iter_mut().find(|(_, s)| s.up) {
            let args: [&[u8]; 2] = [b"CLUSTER", b"SLOTS"];
            let link = shard.link.as_mut().expect("up");
            link.send(&args, Some(Request::Slots), Instant::now());
        }
    }

    /// Shard `key`'s connection is gone: the channels subscribed on it are subscribed
    /// nowhere until it, or their slot's new owner, takes them again.
    fn lost_subscriptions(&mut self, key: usize) {
        self.shards[key].subscribed = false;
        for watched in self.channels.values_mut() {
            if watched.subscribed_on == Some(key) {
                watched.subscribed_on = None;
            }
        }
    }

    /// Shard `key` answered `HELLO`. It takes its channels now (standalone) or once the slot
    /// map says which are its own (cluster): whether this is its first connection, a
    /// reconnect, a replica just promoted or a new owner, and whether or not the map changed.
    pub(super) fn on_up(&mut self, key: usize) {
        let shard = &mut self.shards[key];
        shard.up = true;
        shard.backoff = MIN_BACKOFF;
        log::info!("redis {}: connected", shard.addr);
        if self.map.is_none() || self.map.as_ref().is_some_and(SlotMap::is_cluster) {
            let args: [&[u8]; 2] = [b"CLUSTER", b"SLOTS"];
            let link = shard.link.as_mut().expect("up");
            let now = Instant::now();
            link.send(&args, Some(Request::Slots), now);
            self.next_map_retry = now + MAP_RETRY;
        } else {
            self.resubscribe(key);
        }
    }

    /// A `CLUSTER SLOTS` answer from shard `key`: a map (or, from a standalone Redis, an
    /// error); connects to new masters and resubscribes channels whose owner changed.
    pub(super) fn on_slots(&mut self, key: usize, frame: &Frame) {
        let addr = self.shards[key].addr.clone();
        let seed_host = addr.rsplit_once(':').map_or("", |(host, _)| host);
        let map = match resp::error_text(frame) {
            Some(_) => SlotMap::standalone(&addr),
            None => match SlotMap::from_cluster_slots(frame, seed_host) {
                Some(map) => map,
                None => {
                    log::warn!("redis {addr}: the cluster does not serve every slot yet");
                    return;
                }
            },
        };
        let old = self.map.replace(map.clone());
        // Shards that are no longer masters (a failover, a seed that is a replica) go.
        let gone: Vec<usize> = self
            .shards
            .iter()
            .filter(|(_, s)| !map.masters.contains(&s.addr))
            .map(|(k, _)| k)
            .collect();
        for key in gone {
            self.by_addr.remove(&self.shards[key].addr);
            self.lost_subscriptions(key);
            self.retired.push(key);
        }
        for master in &map.masters {
            let shard = self.shard_for_addr(master);
            if self.shards[shard].link.is_none() && self.shards[shard].retry_at.is_none() {
                self.connect(shard, Instant::now());
            }
        }
        let changed = old.as_ref() != Some(&map);
        if changed && old.is_none() {
            log::info!(
                "redis: {} serving {} master(s)",
                if map.is_cluster() {
                    "cluster"
                } else {
                    "standalone"
                },
                map.masters.len()
            );
        }
        // A new map: every up shard takes the channels it now owns (those it owned already
        // resync, which costs a read and finds nothing). The same map: the shards that came
        // up since take theirs.
        let up: Vec<usize> = self
            .shards
            .iter()
            .filter(|(_, s)| s.up && (changed || !s.subscribed))
            .map(|(k, _)| k)
            .collect();
        for shard in up {
            self.resubscribe(shard);
        }
    }

    /// Subscribes shard `key` to every watched channel it owns (and to broadcasts if it owns
    /// that channel), reads what each missed, sends queued joins and takes leases again.
    pub(super) fn resubscribe(&mut self, key: usize) {
        self.shards[key].subscribed = true;
        let owned = |engine: &RedisEngine, slot: u16| engine.up_shard(slot) == Some(key);
        let names: Vec<Arc<str>> = self
            .channels
            .iter()
            .filter(|(_, w)| owned(self, w.keys.slot()))
            .map(|(name, _)| Arc::clone(name))
            .collect();
        for name in names {
            self.subscribe(&name);
        }
        if owned(self, self.broadcast.slot()) {
            let link = self.shards[key].link.as_mut().expect("up");
            send_subscription(link, "ssubscribe", &self.broadcast.shard_channel);
        }
        for (conn, user) in self.held_leases() {
            let slot = Keys::of(&self.settings.prefix, &user_channel(&user)).slot();
            if owned(self, slot) {
                self.send_lease(&user, conn, Bytes::from_static(RENEW), false);
            }
        }
    }

    /// `SSUBSCRIBE` to a watched channel on its shard, a read of what it missed, and the joins
    /// that waited; nothing while the shard is down (its heal does this).
    pub(super) fn subscribe(&mut self, name: &Arc<str>) {
        let Some(shard) = self.up_shard(self.channels[name].keys.slot()) else {
            return;
        };
        let watched = self.channels.get_mut(name).expect("watched");
        let link = self.shards[shard].link.as_mut().expect("up");
        send_subscription(link, "ssubscribe", &watched.keys.shard_channel);
        watched.subscribed_on = Some(shard);
        let sync = watched.order.resync();
        let queued = std::mem::take(&mut watched.queued);
        if sync.is_some() {
            self.send_read(shard, name, Read::Sync);
        }
        for (conn, since) in queued {
            self.send_read(shard, name, Read::Join(conn, since));
        }
    }

    /// The periodic position check: every `check_interval`, each watched channel whose
    /// subscription is up reads where it stands in Redis, at most [`CHECKS_PER_TICK`] per
    /// tick. What the read fills is counted as a repair (see `on_read`).
    pub(super) fn check_positions(&mut self, now: Instant) {
        if now >= self.next_check {
            self.next_check = now + self.settings.check_interval;
            self.to_check = self.channels.keys().cloned().collect();
        }
        let start = self.to_check.len().saturating_sub(CHECKS_PER_TICK);
        for name in self.to_check.split_off(start) {
            let Some(watched) = self.channels.get_mut(&name) else {
                continue; // unwatched since
            };
            let Some(shard) = watched.subscribed_on.filter(|&s| self.shards[s].up) else {
                continue; // its resubscription reads anyway
            };
            if watched.order.position().is_some() && watched.order.resync().is_some() {
                self.send_read(shard, &name, Read::Check);
            }
        }
    }

    pub(super) fn send_read(&mut self, shard: usize, name: &Arc<str>, read: Read) {
        let watched = &self.channels[name];
        // Who already delivered events reads a newer epoch from its start; the first read
        // of a channel, and a subscribe without `since`, only learn where it stands.
        let (epoch, since, from_start) = match &read {
            Read::Join(_, Some(since)) => (since.epoch.clone(), since.seq, true),
            Read::Join(_, None) => (String::new(), 0, false),
            Read::Sync | Read::Check => match watched.order.position() {
                Some((seq, epoch)) => (epoch.to_string(), seq, true),
                None => (String::new(), 0, false),
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
        ];
        let call = Call::script(Script::Read, script_keys, args);
        let purpose = Purpose::Read {
            channel: Arc::clone(name),
            read,
        };
        self.send_call(shard, call, purpose);
    }

    pub(super) fn send_call(&mut self, shard: usize, call: Call, purpose: Purpose) {
        self.write_call(shard, &call, false);
        let link = self.shards[shard].link.as_mut().expect("up");
        link.expect(Request::Call(call, purpose), Instant::now());
    }

    /// Queues `call` on `shard` as `EVALSHA` (or `EVAL` when the script's SHA1 is not known
    /// or `eval` is asked), preceded by `ASKING` after an `ASK`; the caller adds its tag.
    pub(super) fn write_call(&mut self, shard: usize, call: &Call, eval: bool) {
        let keys = call.keys.to_string();
        let mut args: Vec<&[u8]> = Vec::with_capacity(call.args.len() + 3);
        if let Some(script) = call.script {
            match (&self.shas[script as usize], eval) {
                (Some(sha), false) => args.extend([b"EVALSHA".as_slice(), sha.as_bytes()]),
                _ => args.extend([b"EVAL".as_slice(), script.source().as_bytes()]),
            }
            args.push(keys.as_bytes());
        }
        args.extend(call.args.iter().map(|a| a.as_ref()));
        let link = self.shards[shard].link.as_mut().expect("up");
        if call.asking {
            link.send(
                &[b"ASKING".as_slice()],
                Some(Request::Ignore),
                Instant::now(),
            );
        }
        link.write(&args);
    }
}
