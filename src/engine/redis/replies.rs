//! What Redis sends back, turned into [`Happening`]s: replies to calls (publishes, reads,
//! leases, the slot map), errors (`NOSCRIPT`, `MOVED`, `ASK`, `TRYAGAIN`), and pushes
//! (events on shard channels, subscriptions a slot move took away).

use std::sync::Arc;

use bytes::Bytes;

use super::calls::{Call, Purpose, Request};
use super::resp::{self, Frame, Redirect};
use super::scripts::{self, tag};
use super::{BROADCAST_CHANNEL, MAILBOX_PREFIX, RedisEngine};
use crate::base::channel::user_of;
use crate::base::time::Tick;
use crate::engine::{AckTag, Entry, Happening, Part, Stored, Unavailable};

impl RedisEngine {
    pub(super) fn on_reply(&mut self, key: usize, request: Request, frame: Frame, now: Tick) {
        match request {
            Request::Hello => match resp::error_text(&frame) {
                None => {
                    if self.shards.on_up(key, now) {
                        self.resubscribe(key, now);
                    }
                }
                Some(error) => {
                    // A wrong password or user never heals by itself: say so at every try.
                    let addr = self.shards.get(key).map_or("", |s| s.addr.as_str());
                    log::warn!(
                        "redis {addr}: HELLO refused (check the URL's credentials): {error}"
                    );
                    self.fail(key, "HELLO refused", now);
                }
            },
            Request::Ignore => {}
            Request::Load(script) => match resp::text(&frame) {
                Some(sha) => self.shards.loaded(script, sha),
                None => log::warn!("redis: SCRIPT LOAD failed: {:?}", resp::error_text(&frame)),
            },
            Request::Slots => self.on_slots(key, &frame, now),
            Request::Role => self.on_role(key, &frame, now),
            Request::Subscription(kind, shard_channel) => {
                if let Some(error) = resp::error_text(&frame) {
                    log::info!("redis: {kind} {shard_channel}: {error}");
                    if let Some(Redirect::Moved(slot, addr)) = resp::redirect(&error) {
                        self.shards.moved(slot, &addr, now);
                    }
                    let prefix = &self.settings.prefix;
                    if let Some(channel) = scripts::channel_of(prefix, &shard_channel) {
                        let channel = channel.to_string();
                        self.follow_subscription(&channel, now);
                    }
                    self.shards.refresh_map(now);
                }
            }
            Request::Call(call, purpose) => match resp::error_text(&frame) {
                None => self.on_answer(purpose, &frame, now),
                Some(error) => self.on_call_error(key, call, purpose, &error, now),
            },
        }
    }

    fn on_call_error(&mut self, key: usize, call: Call, purpose: Purpose, error: &str, now: Tick) {
        if error.starts_with("NOSCRIPT") {
            self.shards.write_call(key, &call, true, now);
            self.shards
                .link(key)
                .expect(Request::Call(call, purpose), now);
            return;
        }
        if let Some(redirect) = resp::redirect(error) {
            let (slot, addr, asking) = match &redirect {
                Redirect::Moved(slot, addr) => (*slot, addr.clone(), false),
                Redirect::Ask(slot, addr) => (*slot, addr.clone(), true),
            };
            if !asking {
                self.shards.moved(slot, &addr, now);
                self.shards.refresh_map(now);
            }
            let target = self.shards.key_of(&addr);
            if self.shards.get(target).is_some_and(|s| s.up) {
                if asking {
                    let link = self.shards.link(target);
                    link.send(&[b"ASKING".as_slice()], Some(Request::Ignore), now);
                }
                self.shards.send_call(target, call, purpose, now);
                return;
            }
            self.shards.ensure_connecting(target, now);
        } else if error.starts_with("TRYAGAIN") || error.starts_with("CLUSTERDOWN") {
            // A slot mid-migration (keys on both sides) or a cluster electing: next tick.
            self.retries.push((call, purpose));
            return;
        } else {
            log::warn!("redis: a {:?} call failed: {error}", call.script);
        }
        self.abandon(purpose);
    }

    fn on_answer(&mut self, purpose: Purpose, frame: &Frame, now: Tick) {
        match purpose {
            Purpose::Publish { part, bytes } => {
                self.end_flight(bytes);
                let result = parse_published(frame).ok_or(Unavailable);
                if result.is_err() {
                    log::warn!("redis: unexpected publish reply {frame:?}");
                }
                self.out.push(Happening::Done { part, result });
            }
            Purpose::Signal { op, bytes } => {
                self.end_flight(bytes);
                let nodes = resp::int(frame).unwrap_or(0).max(0) as usize;
                let stored = Stored {
                    seq: 0,
                    nodes: Some(nodes),
                    duplicate: false,
                };
                let part = Part { op, index: 0 };
                self.out.push(Happening::Done {
                    part,
                    result: Ok(stored),
                });
            }
            Purpose::Read { channel, read } => self.on_read(channel, read, frame, now),
            Purpose::Presence => {}
            Purpose::Restore { channel } => self.on_restored(channel, frame, now),
            Purpose::Members { channel, ask } => self.on_members(channel, ask, frame),
            Purpose::Lease { conn, fresh } => {
                if fresh && self.leases.contains_key(&conn) {
                    self.out.push(if resp::int(frame) == Some(0) {
                        Happening::LeaseRefused(conn)
                    } else {
                        Happening::LeaseGranted(conn)
                    });
                }
            }
        }
    }

    // ---- pushes ----

    pub(super) fn on_push(&mut self, frame: &Frame, now: Tick) {
        let Some(parts) = resp::items(frame) else {
            return;
        };
        let (Some(kind), Some(shard_channel)) = (
            parts.first().and_then(resp::text),
            parts.get(1).and_then(resp::text),
        ) else {
            return;
        };
        let prefix = &self.settings.prefix;
        let Some(channel) = scripts::channel_of(prefix, shard_channel) else {
            return;
        };
        match kind {
            "smessage" => {
                let Some(payload) = parts.get(2).and_then(resp::bytes) else {
                    return;
                };
                let channel: Arc<str> = channel.into();
                self.on_message(&channel, payload, now);
            }
            "sunsubscribe" => {
                // Not asked for (the channel is still watched): its slot moved.
                log::info!("redis: the subscription to {channel} moved; resubscribing");
                let channel = channel.to_string();
                self.follow_subscription(&channel, now);
                self.shards.refresh_map(now);
            }
            _ => {}
        }
    }

    fn on_message(&mut self, channel: &Arc<str>, payload: &Bytes, now: Tick) {
        if channel.strip_prefix(MAILBOX_PREFIX) == Some(&self.settings.node_id) {
            self.out.push(Happening::Mail(payload.clone()));
            return;
        }
        let (ack, payload) = match payload.first().copied() {
            Some(tag::ACKED) => {
                let Some((ack, rest)) = parse_ack(payload) else {
                    log::warn!("redis: a malformed acknowledged event on {channel}");
                    return;
                };
                (Some(ack), rest)
            }
            _ => (None, payload.clone()),
        };
        match payload.first().copied() {
            Some(tag::BROADCAST) if &**channel == BROADCAST_CHANNEL => {
                let data = payload.slice(1..);
                self.out.push(Happening::Broadcast { data, from: None });
            }
            Some(tag::PRESENCE) => {
                if self.channels.contains_key(channel) {
                    self.on_presence_change(channel, &payload[1..]);
                }
            }
            Some(tag::DISCONNECT) => {
                if let Some(user) = user_of(channel)
                    && self.channels.contains_key(channel)
                {
                    let user = user.into();
                    self.out.push(Happening::Disconnect { user, from: None });
                }
            }
            Some(kind @ (tag::EVENT | tag::USER_EVENT)) => {
                let Some((seq, epoch, data)) = parse_event(&payload[1..]) else {
                    log::warn!("redis: a malformed event on {channel}");
                    return;
                };
                let data = payload.slice(payload.len() - data..);
                let Some(watched) = self.channels.get_mut(channel) else {
                    return;
                };
                let to_user = kind == tag::USER_EVENT;
                let entry = Entry {
                    seq,
                    to_user,
                    data,
                    ack,
                };
                let mut steps = std::mem::take(&mut self.steps);
                let sync = watched.order.on_event(epoch, entry, &mut steps);
                self.emit(channel, &mut steps);
                self.steps = steps;
                if sync.is_some()
                    && let Some(shard) = self.shards.up(self.channels[channel].keys.slot())
                {
                    self.send_read(shard, channel, super::calls::Read::Sync, now);
                }
            }
            _ => log::warn!("redis: an unknown message on {channel}"),
        }
    }
}

/// `a<ack tag>:<message>` → the tag, and the message.
fn parse_ack(payload: &Bytes) -> Option<(AckTag, Bytes)> {
    let colon = payload.iter().position(|&b| b == b':')?;
    let tag = AckTag::decode(std::str::from_utf8(&payload[1..colon]).ok()?)?;
    Some((tag, payload.slice(colon + 1..)))
}

/// `<seq>:<epoch>:<data>` → seq, epoch, and the length of data (the rest).
fn parse_event(bytes: &[u8]) -> Option<(u64, &str, usize)> {
    let colon = bytes.iter().position(|&b| b == b':')?;
    let seq = std::str::from_utf8(&bytes[..colon]).ok()?.parse().ok()?;
    let rest = &bytes[colon + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let epoch = std::str::from_utf8(&rest[..colon]).ok()?;
    Some((seq, epoch, rest.len() - colon - 1))
}

/// The PUBLISH script's answer.
fn parse_published(frame: &Frame) -> Option<Stored> {
    let parts = resp::items(frame)?;
    match resp::int(parts.first()?)? {
        0 => Some(Stored {
            seq: resp::int(parts.get(1)?)? as u64,
            nodes: Some(resp::int(parts.get(2)?)? as usize),
            duplicate: false,
        }),
        _ => {
            let (seq, nodes) = resp::text(parts.get(1)?)?.split_once(':')?;
            Some(Stored {
                seq: seq.parse().ok()?,
                nodes: Some(nodes.parse().ok()?),
                duplicate: true,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_event_payloads() {
        assert_eq!(parse_event(b"12:ab01:{\"x\":1}"), Some((12, "ab01", 7)));
        assert_eq!(parse_event(b"12:ab01:"), Some((12, "ab01", 0)));
        assert_eq!(parse_event(b"x:ab:1"), None);
        assert_eq!(parse_event(b"12"), None);
    }

    #[test]
    fn reads_acknowledged_events() {
        let payload = Bytes::from_static(b"a1700000000000/42/node-1:e12:ab01:{}");
        let (tag, rest) = parse_ack(&payload).expect("a tag");
        assert_eq!(
            tag,
            AckTag {
                origin: "node-1".into(),
                report: 42,
                deadline_ms: 1_700_000_000_000,
            }
        );
        assert_eq!(&rest[..], b"e12:ab01:{}");
        assert_eq!(tag.encode(), "1700000000000/42/node-1");
        assert_eq!(parse_ack(&Bytes::from_static(b"a12/x/n:e1:a:{}")), None);
        assert_eq!(AckTag::decode("1/2/"), None);
    }
}
