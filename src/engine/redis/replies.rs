//! What Redis sends back, turned into [`Happening`]s: replies to calls (publishes, reads,
//! leases, the slot map), errors (`NOSCRIPT`, `MOVED`, `ASK`, `TRYAGAIN`), and pushes
//! (events on shard channels, subscriptions a slot move took away).

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::resp::{self, Frame, Redirect};
use super::scripts;
use super::sequencer::{Entry, Step};
use super::{
    BROADCAST_CHANNEL, Call, Happening, Purpose, Read, RedisEngine, Request, Stored, Unavailable,
};
use crate::base::channel::user_of;

impl RedisEngine {
    pub(super) fn on_reply(&mut self, key: usize, request: Request, frame: Frame) {
        match request {
            Request::Hello => match resp::error_text(&frame) {
                None => self.on_up(key),
                Some(error) => {
                    // A wrong password or user never heals by itself: say so at every try.
                    let addr = &self.shards[key].addr;
                    log::warn!(
                        "redis {addr}: HELLO refused (check the URL's credentials): {error}"
                    );
                    self.fail(key, "HELLO refused");
                }
            },
            Request::Ignore => {}
            Request::Load(script) => match resp::text(&frame) {
                Some(sha) => self.shas[script as usize] = Some(sha.into()),
                None => log::warn!("redis: SCRIPT LOAD failed: {:?}", resp::error_text(&frame)),
            },
            Request::Slots => self.on_slots(key, &frame),
            Request::Subscription(kind, shard_channel) => {
                if let Some(error) = resp::error_text(&frame) {
                    log::info!("redis: {kind} {shard_channel}: {error}");
                    if let Some(Redirect::Moved(slot, addr)) = resp::redirect(&error) {
                        self.moved(slot, &addr);
                    }
                    let prefix = &self.settings.prefix;
                    if let Some(channel) = scripts::channel_of(prefix, &shard_channel) {
                        let channel = channel.to_string();
                        self.follow_subscription(&channel);
                    }
                    self.refresh_map();
                }
            }
            Request::Call(call, purpose) => match resp::error_text(&frame) {
                None => self.on_answer(purpose, &frame),
                Some(error) => self.on_call_error(key, call, purpose, &error),
            },
        }
    }

    pub(super) fn on_call_error(&mut self, key: usize, call: Call, purpose: Purpose, error: &str) {
        if error.starts_with("NOSCRIPT") {
            self.write_call(key, &call, true);
            let link = self.shards[key].link.as_mut().expect("answered on it");
            link.expect(Request::Call(call, purpose), Instant::now());
            return;
        }
        if let Some(redirect) = resp::redirect(error) {
            let (slot, addr, asking) = match &redirect {
                Redirect::Moved(slot, addr) => (*slot, addr.clone(), false),
                Redirect::Ask(slot, addr) => (*slot, addr.clone(), true),
            };
            if !asking {
                self.moved(slot, &addr);
                self.refresh_map();
            }
            let target = self.shard_for_addr(&addr);
            if self.shards[target].up {
                let link = self.shards[target].link.as_mut().expect("up");
                if asking {
                    link.send(
                        &[b"ASKING".as_slice()],
                        Some(Request::Ignore),
                        Instant::now(),
                    );
                }
                self.write_call(target, &call, false);
                let link = self.shards[target].link.as_mut().expect("up");
                link.expect(Request::Call(call, purpose), Instant::now());
                return;
            }
            if self.shards[target].link.is_none() && self.shards[target].retry_at.is_none() {
                self.connect(target, Instant::now());
            }
        } else if error.starts_with("TRYAGAIN") || error.starts_with("CLUSTERDOWN") {
            // A slot mid-migration (keys on both sides) or a cluster electing: next tick.
            self.retries.push((call, purpose));
            return;
        } else {
            log::warn!("redis: a {:?} call failed: {error}", call.script);
        }
        self.abandon(purpose);
    }

    pub(super) fn on_answer(&mut self, purpose: Purpose, frame: &Frame) {
        match purpose {
            Purpose::Publish { op, part, bytes } => {
                self.end_flight(bytes);
                let result = parse_published(frame).ok_or(Unavailable);
                if result.is_err() {
                    log::warn!("redis: unexpected publish reply {frame:?}");
                }
                self.out.push(Happening::Done { op, part, result });
            }
            Purpose::Signal { op, bytes } => {
                self.end_flight(bytes);
                let nodes = resp::int(frame).unwrap_or(0).max(0) as usize;
                let stored = Stored {
                    seq: 0,
                    nodes,
                    duplicate: false,
                };
                self.out.push(Happening::Done {
                    op,
                    part: 0,
                    result: Ok(stored),
                });
            }
            Purpose::Read { channel, read } => self.on_read(channel, read, frame),
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

    pub(super) fn on_read(&mut self, channel: Arc<str>, read: Read, frame: &Frame) {
        let Some((epoch, seq, entries)) = parse_read(frame) else {
            log::warn!("redis: unexpected read reply {frame:?}");
            return;
        };
        let Some(watched) = self.channels.get_mut(&channel) else {
            return; // unwatched meanwhile
        };
        let mut steps = std::mem::take(&mut self.steps);
        let Read::Join(conn, since) = read else {
            // The channel's own read: deliver what it missed, and read again if held events
            // still leave a hole.
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
                && let Some(shard) = self.up_shard(self.channels[&channel].keys.slot())
            {
                self.send_read(shard, &channel, Read::Sync);
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
        if let Some((seq_delivered, epoch_delivered)) = self.position(&channel) {
            let delivered = (seq_delivered, Arc::clone(epoch_delivered));
            self.out.push(Happening::Joined {
                delivered,
                channel,
                conn,
                since,
                epoch: epoch.into(),
                seq,
                entries,
            });
        }
    }

    pub(super) fn emit(&mut self, channel: &Arc<str>, steps: &mut Vec<Step>) {
        for step in steps.drain(..) {
            self.out.push(match step {
                Step::Deliver(entry) => Happening::Deliver {
                    channel: Arc::clone(channel),
                    entry,
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

    // ---- pushes ----

    pub(super) fn on_push(&mut self, frame: &Frame) {
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
                self.on_message(&channel, payload);
            }
            "sunsubscribe" => {
                // Not asked for (the channel is still watched): its slot moved.
                log::info!("redis: the subscription to {channel} moved; resubscribing");
                let channel = channel.to_string();
                self.follow_subscription(&channel);
                self.refresh_map();
            }
            _ => {}
        }
    }

    pub(super) fn on_message(&mut self, channel: &Arc<str>, payload: &Bytes) {
        match payload.first() {
            Some(b'b') if &**channel == BROADCAST_CHANNEL => {
                self.out.push(Happening::Broadcast(payload.slice(1..)));
            }
            Some(b'd') => {
                if let Some(user) = user_of(channel)
                    && self.channels.contains_key(channel)
                {
                    self.out.push(Happening::Disconnect(user.into()));
                }
            }
            Some(kind @ (b'e' | b'u')) => {
                let to_user = *kind == b'u';
                let Some((seq, epoch, data)) = parse_event(&payload[1..]) else {
                    log::warn!("redis: a malformed event on {channel}");
                    return;
                };
                let data = payload.slice(payload.len() - data..);
                let Some(watched) = self.channels.get_mut(channel) else {
                    return;
                };
                let entry = Entry { seq, to_user, data };
                let mut steps = std::mem::take(&mut self.steps);
                let sync = watched.order.on_event(epoch, entry, &mut steps);
                self.emit(channel, &mut steps);
                self.steps = steps;
                if sync.is_some()
                    && let Some(shard) = self.up_shard(self.channels[channel].keys.slot())
                {
                    self.send_read(shard, channel, Read::Sync);
                }
            }
            _ => log::warn!("redis: an unknown message on {channel}"),
        }
    }

    pub(super) fn new_epoch(&mut self) -> String {
        self.epochs_made += 1;
        let mut hasher = self.epoch_seed.build_hasher();
        hasher.write_u64(self.epochs_made);
        format!("{:08x}", hasher.finish() as u32)
    }
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
            nodes: resp::int(parts.get(2)?)? as usize,
            duplicate: false,
        }),
        _ => {
            let (seq, nodes) = resp::text(parts.get(1)?)?.split_once(':')?;
            Some(Stored {
                seq: seq.parse().ok()?,
                nodes: nodes.parse().ok()?,
                duplicate: true,
            })
        }
    }
}

/// The READ script's answer: epoch, seq, and the entries when they were read.
fn parse_read(frame: &Frame) -> Option<(&str, u64, Option<Vec<Entry>>)> {
    let parts = resp::items(frame)?;
    let epoch = resp::text(parts.first()?)?;
    let seq = resp::int(parts.get(1)?)? as u64;
    let Some(entries) = parts.get(2) else {
        return Some((epoch, seq, None));
    };
    let mut out = Vec::new();
    for entry in resp::items(entries)? {
        let fields = resp::items(entry)?;
        let id = resp::text(fields.first()?)?;
        let seq = id.split_once('-')?.0.parse().ok()?;
        let values = resp::items(fields.get(1)?)?;
        let (mut to_user, mut data) = (false, None);
        for pair in values.chunks(2) {
            match (resp::text(&pair[0])?, pair.get(1)) {
                ("k", Some(kind)) => to_user = resp::text(kind)? == "u",
                ("d", Some(value)) => data = Some(resp::bytes(value)?.clone()),
                _ => {}
            }
        }
        out.push(Entry {
            seq,
            to_user,
            data: data?,
        });
    }
    Some((epoch, seq, Some(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn reads_event_payloads() {
        assert_eq!(parse_event(b"12:ab01:{\"x\":1}"), Some((12, "ab01", 7)));
        assert_eq!(parse_event(b"12:ab01:"), Some((12, "ab01", 0)));
        assert_eq!(parse_event(b"x:ab:1"), None);
        assert_eq!(parse_event(b"12"), None);
    }
}
