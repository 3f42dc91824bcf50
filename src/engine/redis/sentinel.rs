//! Redis with Sentinel (`redis_sentinel`, `redis_master_name`): the Sentinels name the
//! primary, the engine connects to it, and moves when they announce another.
//!
//! One Sentinel connection at a time, in the reactor's `Poll` like a shard's: `HELLO 3`
//! (with `AUTH` when `redis_sentinel_password` is set), `SUBSCRIBE +switch-master`, then
//! `SENTINEL get-master-addr-by-name`, asked again whenever the engine suspects a move (its
//! primary's connection failed, or the node it reached says it is a replica). A Sentinel that
//! fails, does not answer or does not know the name is left for the next one in the list,
//! with the shards' backoff.
//!
//! Invariants: `primary` is the address the Sentinels named last, and `switches` counts its
//! changes; each answer and each `+switch-master` for our name is handed to the engine as an
//! address, in order, and the engine alone decides what it changes; time is the reactor's
//! `Tick`.

use mio::{Registry, Token};

use super::link::{Expected, Incoming, Link};
use super::resp::{self, Frame};
use super::shards::{MAX_BACKOFF, MIN_BACKOFF};
use super::tls::Tls;
use crate::base::time::{Tick, TickSource};

/// The channel Sentinels announce a promotion on.
const SWITCH_MASTER: &str = "+switch-master";

/// What the Sentinel connection waits for.
enum Asked {
    Hello,
    /// `SUBSCRIBE +switch-master`: confirmed by a push.
    Switches,
    Primary,
}

impl Expected for Asked {
    fn answered_by(&self, push: &Frame) -> bool {
        let parts = resp::items(push).unwrap_or_default();
        matches!(self, Asked::Switches)
            && parts.first().and_then(resp::text) == Some("subscribe")
            && parts.get(1).and_then(resp::text) == Some(SWITCH_MASTER)
    }
}

/// Who to ask, and how.
#[derive(Clone, Debug)]
pub struct SentinelSettings {
    /// `host:port` of each Sentinel.
    pub addrs: Vec<String>,
    /// The name they know the primary by.
    pub master_name: String,
    /// Their own password.
    pub password: Option<String>,
}

/// The engine's Sentinel connection.
pub(super) struct Sentinels {
    settings: SentinelSettings,
    tls: Option<Tls>,
    registry: Registry,
    token: Token,
    /// The Sentinel in use, or tried next.
    next: usize,
    link: Option<Link<Asked>>,
    backoff: u64,
    min_backoff: u64,
    max_backoff: u64,
    retry_at: Option<Tick>,
    /// The primary they named last.
    pub primary: Option<String>,
    /// Promotions announced since the start.
    pub switches: u64,
}

impl Sentinels {
    /// Not connected yet; `token` is the one its socket is registered under.
    pub fn new(
        settings: SentinelSettings,
        tls: Option<Tls>,
        registry: Registry,
        token: Token,
        ticks: TickSource,
    ) -> Sentinels {
        let min_backoff = ticks.ticks_in(MIN_BACKOFF);
        Sentinels {
            settings,
            tls,
            registry,
            token,
            next: 0,
            link: None,
            backoff: min_backoff,
            min_backoff,
            max_backoff: ticks.ticks_in(MAX_BACKOFF),
            retry_at: None,
            primary: None,
            switches: 0,
        }
    }

    /// Connects to the next Sentinel: `HELLO`, the switch subscription, the question.
    pub fn connect(&mut self, now: Tick) {
        let addr = self.settings.addrs[self.next].clone();
        match Link::connect(&addr, self.tls.as_ref(), &self.registry, self.token) {
            Ok(mut link) => {
                let mut hello: Vec<&[u8]> = vec![b"HELLO", b"3"];
                if let Some(password) = &self.settings.password {
                    hello.extend([b"AUTH".as_slice(), b"default", password.as_bytes()]);
                }
                link.send(&hello, Some(Asked::Hello), now);
                let subscribe: [&[u8]; 2] = [b"SUBSCRIBE", SWITCH_MASTER.as_bytes()];
                link.send(&subscribe, Some(Asked::Switches), now);
                self.link = Some(link);
                self.retry_at = None;
                self.ask(now);
            }
            Err(why) => self.fail(&why, now),
        }
    }

    /// Asks which node is the primary now (when connected; a new connection asks anyway).
    pub fn ask(&mut self, now: Tick) {
        if let Some(link) = &mut self.link {
            let args: [&[u8]; 3] = [
                b"SENTINEL",
                b"get-master-addr-by-name",
                self.settings.master_name.as_bytes(),
            ];
            link.send(&args, Some(Asked::Primary), now);
        }
    }

    /// Readiness on the Sentinel's socket: the primaries it named (`host:port`), in order.
    pub fn on_ready(&mut self, now: Tick) -> Vec<String> {
        let Some(link) = &mut self.link else {
            return Vec::new();
        };
        let mut incoming = Vec::new();
        let result = link.on_ready(&mut incoming);
        let mut named = Vec::new();
        let mut refused = None;
        for item in incoming {
            match item {
                Incoming::Reply(Asked::Hello, frame) => {
                    refused = refused.or(resp::error_text(&frame)
                        .map(|e| format!("HELLO refused (check redis_sentinel_password): {e}")));
                }
                Incoming::Reply(Asked::Switches, _) => {}
                Incoming::Reply(Asked::Primary, frame) => match primary_of(&frame) {
                    Some(addr) => named.push(addr),
                    None => {
                        refused = refused.or(Some(format!(
                            "knows no primary named {:?}",
                            self.settings.master_name
                        )));
                    }
                },
                Incoming::Push(frame) => {
                    if let Some(addr) = switch_of(&frame, &self.settings.master_name) {
                        named.push(addr);
                    }
                }
            }
        }
        for addr in &named {
            // A switch is a new primary, however the node learned of it: the +switch-master
            // push, or the answer to its question after the old primary failed (the push
            // may come later, or be lost with a Sentinel connection).
            if self.primary.as_ref().is_some_and(|known| known != addr) {
                self.switches += 1;
            }
            self.primary = Some(addr.clone());
            self.backoff = self.min_backoff;
        }
        if let Some(why) = refused.or(result.err()) {
            self.fail(&why, now);
        }
        named
    }

    /// Writes what is queued.
    pub fn flush(&mut self, now: Tick) {
        if let Some(Err(why)) = self.link.as_mut().map(Link::flush) {
            self.fail(&why, now);
        }
    }

    /// Reconnects once the backoff is over; gives up on a Sentinel that has not answered for
    /// `timeout` ticks.
    pub fn tick(&mut self, now: Tick, timeout: u64) {
        let stalled = self.link.as_ref().and_then(Link::oldest_wait);
        if stalled.is_some_and(|sent| now.since(sent) > timeout) {
            self.fail("no reply within redis_timeout", now);
        }
        if self.link.is_none() && self.retry_at.is_none_or(|at| at <= now) {
            self.connect(now);
        }
    }

    /// The Sentinel in use failed: the next one is tried after the backoff.
    fn fail(&mut self, why: &str, now: Tick) {
        let addr = &self.settings.addrs[self.next];
        log::warn!("redis sentinel {addr}: {why}; trying the next Sentinel");
        if let Some(link) = self.link.take() {
            drop(link.close(&self.registry));
        }
        self.next = (self.next + 1) % self.settings.addrs.len();
        self.retry_at = Some(now.after(self.backoff));
        self.backoff = (self.backoff * 2).min(self.max_backoff);
    }
}

/// `host:port` from an answer to `get-master-addr-by-name` (`[host, port]`; null for an
/// unknown name).
fn primary_of(frame: &Frame) -> Option<String> {
    let parts = resp::items(frame)?;
    let host = parts.first().and_then(resp::text)?;
    let port = parts.get(1).and_then(resp::text)?;
    Some(format!("{host}:{port}"))
}

/// The new primary of a `+switch-master` push for `name`:
/// `["message", "+switch-master", "<name> <old host> <old port> <new host> <new port>"]`.
fn switch_of(push: &Frame, name: &str) -> Option<String> {
    let parts = resp::items(push)?;
    if parts.first().and_then(resp::text) != Some("message")
        || parts.get(1).and_then(resp::text) != Some(SWITCH_MASTER)
    {
        return None;
    }
    let text = parts.get(2).and_then(resp::text)?;
    let fields: Vec<&str> = text.split(' ').collect();
    match fields[..] {
        [master, _, _, host, port] if master == name => Some(format!("{host}:{port}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};

    fn decode(bytes: &[u8]) -> Frame {
        let mut buf = BytesMut::from(bytes);
        resp::decode(&mut buf).unwrap().unwrap()
    }

    #[test]
    fn answers_and_announcements() {
        let answer = decode(b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n");
        assert_eq!(primary_of(&answer).as_deref(), Some("127.0.0.1:6380"));
        assert_eq!(primary_of(&decode(b"_\r\n")), None, "an unknown name");
        let push = |text: &str| {
            let bytes = format!(
                ">3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n${}\r\n{text}\r\n",
                text.len()
            );
            decode(&Bytes::from(bytes))
        };
        let switch = push("mymaster 10.0.0.1 6379 10.0.0.2 6380");
        assert_eq!(
            switch_of(&switch, "mymaster").as_deref(),
            Some("10.0.0.2:6380")
        );
        assert_eq!(
            switch_of(&switch, "other"),
            None,
            "another primary's switch"
        );
        assert_eq!(switch_of(&push("garbled"), "mymaster"), None);
        assert!(Asked::Switches.answered_by(&decode(
            b">3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n"
        )));
    }
}
