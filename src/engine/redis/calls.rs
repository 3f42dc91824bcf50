//! What the engine asks of Redis, and why. A [`Request`] is what a reply answers (one entry in
//! a link's queue per command that expects a reply, in send order); a [`Call`] is a command
//! that can be sent again (as `EVAL` after `NOSCRIPT`, to another node after `MOVED` or
//! `ASK`, on the next tick after `TRYAGAIN`); its [`Purpose`] says what the answer is for.

use std::sync::Arc;

use bytes::Bytes;

use super::link::Expected;
use super::resp::{self, Frame};
use super::scripts::Script;
use crate::base::channel::Backfill;
use crate::base::ids::ConnId;
use crate::engine::{OpId, Part};

/// What a reply answers.
pub(super) enum Request {
    Hello,
    Ignore,
    Load(Script),
    Slots,
    /// `ROLE`, under Sentinel: is the node the primary?
    Role,
    /// `SSUBSCRIBE` or `SUNSUBSCRIBE` of a shard channel: confirmed by a push.
    Subscription(&'static str, String),
    Call(Call, Purpose),
}

impl Expected for Request {
    fn answered_by(&self, push: &Frame) -> bool {
        let Request::Subscription(kind, channel) = self else {
            return false;
        };
        let parts = resp::items(push).unwrap_or_default();
        parts.first().and_then(resp::text) == Some(kind)
            && parts.get(1).and_then(resp::text) == Some(channel.as_str())
    }
}

/// A command that can be sent again.
pub(super) struct Call {
    pub script: Option<Script>,
    /// Sent after an `ASK`: `ASKING` goes first, every time it is sent.
    pub asking: bool,
    pub keys: usize,
    /// The script's keys then arguments; or a whole command when `script` is `None`.
    pub args: Vec<Bytes>,
}

impl Call {
    /// A call of `script` on `keys` (the first decides the slot) with arguments `args`.
    pub fn script(script: Script, keys: Vec<Bytes>, args: impl IntoIterator<Item = Bytes>) -> Call {
        let count = keys.len();
        let mut all = keys;
        all.extend(args);
        Call {
            script: Some(script),
            asking: false,
            keys: count,
            args: all,
        }
    }

    /// A plain command, `args[1]` deciding the slot (a shard channel).
    pub fn command(args: Vec<Bytes>) -> Call {
        Call {
            script: None,
            asking: false,
            keys: 0,
            args,
        }
    }

    /// The slot its first key (or, for a command, its channel) is in.
    pub fn slot(&self) -> u16 {
        let key = if self.script.is_some() {
            &self.args[0]
        } else {
            &self.args[1]
        };
        redis_protocol::redis_keyslot(key)
    }
}

/// What a call's answer is for.
pub(super) enum Purpose {
    /// `bytes`: the event's size, counted in flight.
    Publish {
        part: Part,
        bytes: usize,
    },
    /// A broadcast or a disconnect (`SPUBLISH`), part 0 of `op`.
    Signal {
        op: OpId,
        bytes: usize,
    },
    Read {
        channel: Arc<str>,
        read: Read,
    },
    /// `fresh`: the connection waits for it to be told `connected`.
    Lease {
        conn: ConnId,
        fresh: bool,
    },
    /// A presence roster's change: nothing waits for the answer.
    Presence,
    /// This node's connections put back in `channel`'s roster after its shard came back.
    Restore {
        channel: Arc<str>,
    },
    /// A presence roster's read, for the fan-out's question `ask`.
    Members {
        channel: Arc<str>,
        ask: usize,
    },
}

/// Why a channel's stream is read.
pub(super) enum Read {
    /// The channel's own read, after (re)subscribing or a skipped seq: fills what was missed.
    Sync,
    /// The periodic position check: anything it fills is a repair (a lost pub/sub message,
    /// or a bug), counted and logged.
    Check,
    /// A joining connection's read, with what it asks besides the position.
    Join(ConnId, Backfill),
}
