//! The Redis engine's connections: one [`Shard`] per master (or the standalone Redis, or the
//! primary the Sentinels name), found from the seed URLs and the slot map (or from the
//! Sentinels), each connected with backoff (over TLS when its URL is `rediss://` or
//! `redis_tls` is on), and how calls are written to them (`EVALSHA`, `EVAL` after `NOSCRIPT`,
//! `ASKING` after `ASK`).
//!
//! Invariants: a shard is `up` only while its link answered `HELLO` (and, under Sentinel,
//! `ROLE` said it is the primary); `subscribed` is false
//! from each (re)connect until the engine has subscribed the shard's channels on it under the
//! current map; a shard whose link is gone has a `retry_at`, or is retired; time is the
//! reactor's `Tick`, passed in.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Duration;

use mio::Registry;
use slab::Slab;

use super::calls::{Call, Purpose, Request};
use super::cluster::SlotMap;
use super::link::Link;
use super::resp::{self, Frame};
use super::scripts::Script;
use super::tls::Tls;
use crate::base::time::{Tick, TickSource};
use crate::config::RedisUrl;
use crate::engine::TokenOf;

/// First wait after a connection fails (a shard's, or the Sentinel connection's).
pub(super) const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Least time between two reads of the slot map while a shard that is up has not taken its
/// channels (its map answer was not usable).
const MAP_RETRY: Duration = Duration::from_secs(1);

/// One master (or the standalone Redis).
pub(super) struct Shard {
    pub addr: String,
    pub link: Option<Link<Request>>,
    /// `HELLO` answered: commands may be sent.
    pub up: bool,
    /// Every watched channel this shard owns was subscribed on its current connection,
    /// under the current slot map.
    pub subscribed: bool,
    /// The wait before the next attempt, in ticks.
    backoff: u64,
    retry_at: Option<Tick>,
}

/// What a slot-map answer changed.
pub(super) enum MapAnswer {
    /// Not a usable map (a cluster still electing): asked again later.
    Unusable,
    /// The map, new or the same as before.
    Read {
        /// It differs from the one known.
        changed: bool,
    },
}

/// How the shards are reached.
pub(super) struct Access {
    /// Seeds; under Sentinel at most one, for its credentials and scheme.
    pub urls: Vec<RedisUrl>,
    /// The Sentinels name the primary: no seeds to walk, and a `ROLE` check on connect.
    pub sentinel: bool,
    /// TLS, for the connections that use it.
    pub tls: Option<Tls>,
    /// `redis_tls`: every connection uses it.
    pub tls_everywhere: bool,
}

/// The connections to Redis.
pub(super) struct Shards {
    access: Access,
    /// `CLIENT SETNAME`.
    name: String,
    registry: Registry,
    token_of: TokenOf,
    list: Slab<Shard>,
    by_addr: HashMap<String, usize>,
    map: Option<SlotMap>,
    /// Which seed to try next while no map is known.
    next_seed: usize,
    shas: [Option<Box<str>>; super::scripts::ALL.len()],
    jitter: RandomState,
    min_backoff: u64,
    max_backoff: u64,
    map_retry: u64,
    next_map_retry: Tick,
    /// Shards no longer in the slot map, removed once the read in progress is over.
    retired: Vec<usize>,
    /// Connections lost since the start.
    pub disconnects: u64,
}

impl Shards {
    /// No connection yet; [`start`](Shards::start) makes the first.
    pub fn new(
        access: Access,
        node_id: &str,
        registry: Registry,
        token_of: TokenOf,
        ticks: TickSource,
    ) -> Shards {
        Shards {
            access,
            name: format!("sidecast-{node_id}"),
            registry,
            token_of,
            list: Slab::new(),
            by_addr: HashMap::new(),
            map: None,
            next_seed: 0,
            shas: Default::default(),
            jitter: RandomState::new(),
            min_backoff: ticks.ticks_in(MIN_BACKOFF),
            max_backoff: ticks.ticks_in(MAX_BACKOFF),
            map_retry: ticks.ticks_in(MAP_RETRY),
            next_map_retry: Tick(0),
            retired: Vec::new(),
            disconnects: 0,
        }
    }

    /// Starts connecting to the first seed.
    pub fn start(&mut self, now: Tick) {
        let seed = self.access.urls[0].host_port.clone();
        let key = self.key_of(&seed);
        self.connect(key, now);
    }

    /// The shard at `addr`, made (not connected) if it is new.
    pub fn key_of(&mut self, addr: &str) -> usize {
        if let Some(&key) = self.by_addr.get(addr) {
            return key;
        }
        let key = self.list.insert(Shard {
            addr: addr.to_string(),
            link: None,
            up: false,
            subscribed: false,
            backoff: self.min_backoff,
            retry_at: None,
        });
        self.by_addr.insert(addr.to_string(), key);
        key
    }

    /// The shard that owns `slot`, when its connection is up.
    pub fn up(&self, slot: u16) -> Option<usize> {
        let owner = self.map.as_ref()?.owner(slot);
        let key = *self.by_addr.get(owner)?;
        self.list[key].up.then_some(key)
    }

    /// The link of the shard that owns `slot`, when it is up.
    pub fn up_link(&mut self, slot: u16) -> Option<(usize, &mut Link<Request>)> {
        let key = self.up(slot)?;
        Some((key, self.link(key)))
    }

    /// Shard `key`'s link, which is up.
    pub fn link(&mut self, key: usize) -> &mut Link<Request> {
        self.list[key]
            .link
            .as_mut()
            .expect("an up shard has a link")
    }

    pub fn get(&self, key: usize) -> Option<&Shard> {
        self.list.get(key)
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut Shard> {
        self.list.get_mut(key)
    }

    /// Keys of the shards for which `keep` holds.
    pub fn keys(&self, keep: impl Fn(&Shard) -> bool) -> Vec<usize> {
        let shards = self.list.iter();
        shards.filter(|(_, s)| keep(s)).map(|(k, _)| k).collect()
    }

    /// Shards known, and how many are up.
    pub fn counts(&self) -> (usize, usize) {
        let up = self.list.iter().filter(|(_, s)| s.up).count();
        (self.list.len(), up)
    }

    /// Whether the slot map is known.
    pub fn has_map(&self) -> bool {
        self.map.is_some()
    }

    fn is_cluster(&self) -> bool {
        self.map.as_ref().is_some_and(SlotMap::is_cluster)
    }

    /// The URL (and so the credentials and scheme) to use for `addr`: a seed's own, or the
    /// first seed's for a node the cluster (or the Sentinels) named; none under Sentinel
    /// without a `redis_url`.
    fn url_for(&self, addr: &str) -> Option<&RedisUrl> {
        let urls = &self.access.urls;
        urls.iter().find(|u| u.host_port == addr).or(urls.first())
    }

    /// The TLS to connect to `addr` with, if any.
    fn tls_for(&self, addr: &str) -> Option<&Tls> {
        let wanted = self.access.tls_everywhere || self.url_for(addr).is_some_and(|u| u.tls);
        self.access.tls.as_ref().filter(|_| wanted)
    }

    /// Opens shard `key`'s connection: `HELLO 3` (with `AUTH`), `SETNAME`, the scripts.
    pub fn connect(&mut self, key: usize, now: Tick) {
        let addr = self.list[key].addr.clone();
        let token = (self.token_of)(key);
        match Link::connect(&addr, self.tls_for(&addr), &self.registry, token) {
            Ok(mut link) => {
                let mut hello: Vec<&[u8]> = vec![b"HELLO", b"3"];
                if let Some(RedisUrl {
                    user: Some(user),
                    password: Some(password),
                    ..
                }) = self.url_for(&addr)
                {
                    hello.extend([b"AUTH".as_slice(), user.as_bytes(), password.as_bytes()]);
                }
                hello.extend([b"SETNAME".as_slice(), self.name.as_bytes()]);
                link.send(&hello, Some(Request::Hello), now);
                for script in [Script::Publish, Script::Read, Script::Lease] {
                    let args: [&[u8]; 3] = [b"SCRIPT", b"LOAD", script.source().as_bytes()];
                    link.send(&args, Some(Request::Load(script)), now);
                }
                self.list[key].link = Some(link);
                self.list[key].retry_at = None;
            }
            Err(why) => {
                log::warn!("redis {addr}: cannot connect: {why}");
                self.schedule_retry(key, now);
            }
        }
    }

    /// Connects shard `key` unless it is connected or waiting for its retry.
    pub fn ensure_connecting(&mut self, key: usize, now: Tick) {
        let shard = &self.list[key];
        if shard.link.is_none() && shard.retry_at.is_none() {
            self.connect(key, now);
        }
    }

    /// The next attempt after a backoff: doubling from `MIN_BACKOFF` to `MAX_BACKOFF`, full
    /// jitter over its upper half, so nodes that lost Redis together spread out.
    pub fn schedule_retry(&mut self, key: usize, now: Tick) {
        let jitter = self.jitter.hash_one(now) % 1000;
        let shard = &mut self.list[key];
        let wait = shard.backoff / 2 + shard.backoff * jitter / 2000;
        shard.retry_at = Some(now.after(wait.max(1)));
        shard.backoff = (shard.backoff * 2).min(self.max_backoff);
        if self.map.is_none() && !self.access.sentinel {
            // No map yet: try the next seed.
            let urls = &self.access.urls;
            self.next_seed = (self.next_seed + 1) % urls.len();
            let seed = urls[self.next_seed].host_port.clone();
            if seed != self.list[key].addr {
                self.by_addr.remove(&self.list[key].addr);
                self.by_addr.insert(seed.clone(), key);
                self.list[key].addr = seed;
            }
        }
    }

    /// Shard `key`'s connection failed: closes it (returning what waited for a reply, in
    /// send order) and schedules the next attempt; re-reads a cluster's map, which a
    /// failover may have changed.
    pub fn fail(&mut self, key: usize, why: &str, now: Tick) -> Vec<Request> {
        let Some(link) = self.list[key].link.take() else {
            return Vec::new();
        };
        let shard = &mut self.list[key];
        shard.subscribed = false;
        if std::mem::replace(&mut shard.up, false) {
            self.disconnects += 1;
            log::warn!("redis {}: connection lost: {why}", link.addr);
        } else if why.starts_with("TLS") {
            // A certificate that does not verify never heals by itself: say so every time.
            log::warn!("redis {}: cannot connect: {why}", link.addr);
        } else {
            // Retries of a connection that never came up: one line per attempt at debug.
            log::debug!("redis {}: cannot connect: {why}", link.addr);
        }
        let waiting = link.close(&self.registry).collect();
        self.schedule_retry(key, now);
        if self.is_cluster() {
            self.refresh_map(now);
        }
        waiting
    }

    /// Shard `key` answered `HELLO`: it is up, and reads the slot map when there may be one.
    /// Returns true when it can take its channels now (a standalone Redis); a cluster's
    /// shard takes them once the map answers.
    pub fn on_up(&mut self, key: usize, now: Tick) -> bool {
        let shard = &mut self.list[key];
        shard.up = true;
        shard.backoff = self.min_backoff;
        log::info!("redis {}: connected", shard.addr);
        if self.access.sentinel {
            // The Sentinels may name a node that was just demoted: it takes its channels
            // once `ROLE` says it is the primary.
            let args: [&[u8]; 1] = [b"ROLE"];
            self.link(key).send(&args, Some(Request::Role), now);
            return false;
        }
        if self.map.is_none() || self.is_cluster() {
            let args: [&[u8]; 2] = [b"CLUSTER", b"SLOTS"];
            self.link(key).send(&args, Some(Request::Slots), now);
            self.next_map_retry = now.after(self.map_retry);
            return false;
        }
        true
    }

    /// Asks an up shard for the slot map.
    pub fn refresh_map(&mut self, now: Tick) {
        if let Some(key) = self.list.iter().find(|(_, s)| s.up).map(|(k, _)| k) {
            let args: [&[u8]; 2] = [b"CLUSTER", b"SLOTS"];
            self.link(key).send(&args, Some(Request::Slots), now);
        }
    }

    /// Asks for the map again, at most once per `MAP_RETRY`, while a shard that is up has not
    /// taken its channels (its map answer was unusable).
    pub fn retry_map(&mut self, now: Tick) {
        if now >= self.next_map_retry && self.list.iter().any(|(_, s)| s.up && !s.subscribed) {
            self.next_map_retry = now.after(self.map_retry);
            self.refresh_map(now);
        }
    }

    /// A `CLUSTER SLOTS` answer from shard `key` (from a standalone Redis, an error): keeps
    /// the map, connects to new masters, retires shards that are no longer masters.
    pub fn on_slots(&mut self, key: usize, frame: &Frame, now: Tick) -> MapAnswer {
        let addr = self.list[key].addr.clone();
        let seed_host = addr.rsplit_once(':').map_or("", |(host, _)| host);
        let map = match resp::error_text(frame) {
            Some(_) => SlotMap::standalone(&addr),
            None => match SlotMap::from_cluster_slots(frame, seed_host) {
                Some(map) => map,
                None => {
                    log::warn!("redis {addr}: the cluster does not serve every slot yet");
                    return MapAnswer::Unusable;
                }
            },
        };
        self.adopt(map, now)
    }

    /// Shard `key` is the one Redis (the primary the Sentinels named): the map says so.
    pub fn standalone(&mut self, key: usize, now: Tick) -> MapAnswer {
        let map = SlotMap::standalone(&self.list[key].addr);
        self.adopt(map, now)
    }

    /// Keeps `map`: connects to new masters, retires shards that are no longer masters.
    fn adopt(&mut self, map: SlotMap, now: Tick) -> MapAnswer {
        let old = self.map.replace(map.clone());
        for gone in self.keys(|s| !map.masters.contains(&s.addr)) {
            self.by_addr.remove(&self.list[gone].addr);
            self.retired.push(gone);
        }
        for master in &map.masters {
            let shard = self.key_of(master);
            self.ensure_connecting(shard, now);
        }
        let changed = old.as_ref() != Some(&map);
        if changed && old.is_none() {
            let kind = if map.is_cluster() {
                "cluster"
            } else {
                "standalone"
            };
            log::info!("redis: {kind} serving {} master(s)", map.masters.len());
        }
        MapAnswer::Read { changed }
    }

    /// The one shard there is under Sentinel, if it was made yet.
    pub fn sole(&self) -> Option<usize> {
        self.list.iter().next().map(|(key, _)| key)
    }

    /// Shard `key` (without a link) is at `addr` from now on.
    pub fn readdress(&mut self, key: usize, addr: &str) {
        let shard = &mut self.list[key];
        debug_assert!(shard.link.is_none());
        self.by_addr.remove(&shard.addr);
        self.by_addr.insert(addr.to_string(), key);
        shard.addr = addr.to_string();
        shard.backoff = self.min_backoff;
        shard.retry_at = None;
    }

    /// A `MOVED`: `slot` lives on `addr` now; connects to it if it is new.
    pub fn moved(&mut self, slot: u16, addr: &str, now: Tick) {
        if let Some(map) = &mut self.map {
            map.moved(slot, addr);
        }
        let target = self.key_of(addr);
        self.ensure_connecting(target, now);
    }

    /// Removes the shards a new slot map left out; returns their keys and what still waited
    /// on them.
    pub fn remove_retired(&mut self) -> Vec<(usize, Vec<Request>)> {
        let mut removed = Vec::new();
        for key in std::mem::take(&mut self.retired) {
            let shard = self.list.remove(key);
            log::info!("redis {}: no longer a master; disconnected", shard.addr);
            let waiting = shard.link.map(|link| link.close(&self.registry).collect());
            removed.push((key, waiting.unwrap_or_default()));
        }
        removed
    }

    /// Shards whose oldest request has waited longer than `timeout` ticks.
    pub fn stalled(&self, now: Tick, timeout: u64) -> Vec<usize> {
        self.keys(|s| {
            s.link
                .as_ref()
                .and_then(Link::oldest_wait)
                .is_some_and(|sent| now.since(sent) > timeout)
        })
    }

    /// Reconnects the shards whose backoff is over.
    pub fn reconnect_due(&mut self, now: Tick) {
        for key in self.keys(|s| s.link.is_none() && s.retry_at.is_some_and(|at| at <= now)) {
            self.connect(key, now);
        }
    }

    /// Writes every connection's queued commands; returns those that failed.
    pub fn flush(&mut self) -> Vec<(usize, String)> {
        let shards = self.list.iter_mut();
        shards
            .filter_map(|(key, shard)| match shard.link.as_mut()?.flush() {
                Ok(()) => None,
                Err(why) => Some((key, why)),
            })
            .collect()
    }

    /// A script's SHA1, answered to `SCRIPT LOAD`.
    pub fn loaded(&mut self, script: Script, sha: &str) {
        self.shas[script as usize] = Some(sha.into());
    }

    /// Sends `call` on `key` and keeps it, with its purpose, for the reply.
    pub fn send_call(&mut self, key: usize, call: Call, purpose: Purpose, now: Tick) {
        self.write_call(key, &call, false, now);
        self.link(key).expect(Request::Call(call, purpose), now);
    }

    /// Queues `call` on `key` as `EVALSHA` (or `EVAL` when the script's SHA1 is not known or
    /// `eval` is asked), preceded by `ASKING` after an `ASK`; the caller adds its tag.
    pub fn write_call(&mut self, key: usize, call: &Call, eval: bool, now: Tick) {
        let keys = call.keys.to_string();
        let mut args: Vec<&[u8]> = Vec::with_capacity(call.args.len() + 3);
        if let Some(script) = call.script {
            match (&self.shas[script as usize], eval) {
                (Some(sha), false) => args.extend([b"EVALSHA".as_slice(), sha.as_bytes()]),
                _ => args.extend([b"EVAL".as_slice(), script.source().as_bytes()]),
            }
            args.push(keys.as_bytes());
        }
        args.extend(call.args.iter().map(AsRef::as_ref));
        let link = self.list[key]
            .link
            .as_mut()
            .expect("an up shard has a link");
        if call.asking {
            link.send(&[b"ASKING".as_slice()], Some(Request::Ignore), now);
        }
        link.write(&args);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn shards() -> Shards {
        let poll = mio::Poll::new().unwrap();
        let registry = poll.registry().try_clone().unwrap();
        let url = "redis://127.0.0.1:1".parse().unwrap();
        let ticks = TickSource::new(Instant::now(), Duration::from_millis(10));
        let access = Access {
            urls: vec![url],
            sentinel: false,
            tls: None,
            tls_everywhere: false,
        };
        Shards::new(access, "n", registry, mio::Token, ticks)
    }

    #[test]
    fn retries_back_off_from_100ms_doubling_to_5s_with_jitter_in_the_upper_half() {
        let mut shards = shards();
        let key = shards.key_of("127.0.0.1:1");
        let mut now = Tick(1000);
        let mut waits = Vec::new();
        for _ in 0..10 {
            shards.schedule_retry(key, now);
            let at = shards.get(key).unwrap().retry_at.unwrap();
            waits.push(at.since(now));
            now = at;
        }
        // 10 ticks of 10 ms, then 20, 40, ... up to 500; each wait in [backoff/2, backoff].
        let backoffs = [10, 20, 40, 80, 160, 320, 500, 500, 500, 500];
        for (wait, backoff) in waits.iter().zip(backoffs) {
            assert!(
                (backoff / 2..=backoff).contains(wait),
                "{waits:?}: {wait} outside [{}, {backoff}]",
                backoff / 2
            );
        }
        shards.connect(key, now);
        shards.on_up(key, now);
        assert_eq!(shards.get(key).unwrap().backoff, 10, "reset once up");
    }

    #[test]
    fn a_request_older_than_the_timeout_stalls_its_shard() {
        let mut shards = shards();
        let key = shards.key_of("127.0.0.1:1");
        assert!(shards.stalled(Tick(0), 200).is_empty(), "no link");
        shards.connect(key, Tick(5));
        assert!(
            shards.stalled(Tick(205), 200).is_empty(),
            "200 ticks: not yet"
        );
        assert_eq!(shards.stalled(Tick(206), 200), [key]);
    }
}
