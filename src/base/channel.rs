//! Channel names: what a valid one is, the server's reserved ones, the per-user channel, and
//! a resuming client's position in a channel ([`Since`]) and what a subscribe asks to be
//! given before live events ([`Backfill`]).

use std::fmt;

/// Longest channel name, in bytes (all allowed characters are ASCII).
pub const MAX_CHANNEL_LEN: usize = 128;
/// Channels under this prefix belong to the server: clients may subscribe, publishers may not.
pub const RESERVED_PREFIX: &str = "sidecast:";
/// The server's own stats feed, published once a second while the dashboard is on.
pub const STATS_CHANNEL: &str = "sidecast:stats";

/// A validated channel name: 1 to 128 characters of `[A-Za-z0-9_:.-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChannelName(Box<str>);

impl ChannelName {
    /// Validates `name`.
    ///
    /// # Errors
    /// A human-readable reason when the name is empty, too long or has a forbidden character.
    pub fn parse(name: &str) -> Result<ChannelName, &'static str> {
        check_channel(name)?;
        Ok(ChannelName(name.into()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a channel name without allocating.
///
/// # Errors
/// A human-readable reason when the name is invalid.
pub fn check_channel(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("channel name is empty");
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err("channel name is longer than 128 characters");
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-');
    if !name.bytes().all(allowed) {
        return Err("channel name may only contain A-Z a-z 0-9 _ : . -");
    }
    Ok(())
}

/// The prefix of a user's own channel, `user:<id>`.
const USER_PREFIX: &str = "user:";

/// The channel of `user`'s events: `user:<id>`.
pub fn user_channel(user: &str) -> String {
    format!("{USER_PREFIX}{user}")
}

/// The user whose channel `channel` is, if it is one.
pub fn user_of(channel: &str) -> Option<&str> {
    channel.strip_prefix(USER_PREFIX)
}

/// What a subscribe asks for besides the live events: a resume from `since`, and, when
/// there is nothing to resume or it cannot be recovered, the channel's last `rewind` events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backfill {
    /// The last event the client saw.
    pub since: Option<Since>,
    /// How many of the channel's latest events to deliver (0: none).
    pub rewind: usize,
}

/// The last event a resuming client saw on a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Since {
    /// Its sequence number.
    pub seq: u64,
    /// The channel epoch it belongs to.
    pub epoch: String,
}
